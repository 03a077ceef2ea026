"""Run results (CONTRACT §7): output caps on a character boundary, the outcome status, env and stdin."""
import logging

import pytest

from bus_containers_provider import create_app, start, stop
from bus_containers_provider.results import cap, outcome, settle
from conftest import AnsweringBus, bearer, env, events_env

RUNS = "/api/v1/containers/runs"


@pytest.mark.parametrize("text,limit,expected,cut", [
    ("abc", 3, "abc", False),
    ("abcd", 3, "abc", True),
    ("", 0, "", False),
    ("é", 1, "", True),  # two bytes: never half a character
    ("aé", 2, "a", True),
    ("aé", 3, "aé", False),
    ("€€", 5, "€", True),  # three bytes each
    ("😀x", 4, "😀", True),  # four bytes
    ("😀x", 3, "", True),
])
def test_cap_cuts_on_a_character_boundary(text, limit, expected, cut):
    assert cap(text, limit) == (expected, cut)
    assert len(cap(text, limit)[0].encode()) <= limit


def test_cap_takes_output_with_lone_surrogates():
    # JSON lets an integration send "\ud800"; the answer is capped like any other, never a 500.
    text, cut = cap("\ud800" * 4 + "abc", 8)
    assert cut and len(text.encode("utf-8", "surrogatepass")) <= 8


@pytest.mark.parametrize("reply,status", [
    ({"exit_code": 0}, "succeeded"),
    ({"exit_code": 1}, "failed"),
    ({"exit_code": -9}, "failed"),
    ({"exit_code": 0, "timed_out": True}, "timed_out"),
    ({"exit_code": 137, "timed_out": True}, "timed_out"),
    ({"exit_code": 0, "timed_out": False}, "succeeded"),
    ({"exit_code": 0, "status": "cancelled"}, "cancelled"),
    ({"exit_code": 1, "status": "error"}, "error"),
    ({"exit_code": 0, "status": "timed_out"}, "timed_out"),
    ({"exit_code": 2, "status": "weird"}, "failed"),  # not one of ours: the exit code decides
    ({"exit_code": 0, "status": "SUCCEEDED", "timed_out": True}, "timed_out"),
])
def test_outcome_follows_the_contract_order(reply, status):
    assert outcome(reply) == status


def test_settle_always_carries_the_flags_and_keeps_an_integration_cut():
    settled = settle({"stdout": "ok", "stderr": "", "exit_code": 0, "stderr_truncated": True}, 100)
    assert settled["stdout_truncated"] is False and settled["stderr_truncated"] is True
    assert "timed_out" not in settle({"stdout": "", "stderr": "", "exit_code": 0, "timed_out": False}, 10)


def reply(**fields):
    payload = {"run_id": None, "owner_account_id": "acct-a", "runner_name": "r", "image": "alpine",
               "args": ["x"], "exit_code": 0, "stdout": "", "stderr": "", "duration_ms": 5,
               "runtime": {"state": "ready", "provider": "p"}, **fields}
    return {"name": "bus.containers.run.response", "correlationId": "c", "payload": payload}


class EchoRunBus(AnsweringBus):
    """Answers a run with its own run_id, so the reply passes the same-run check."""

    def __init__(self, envelope):
        super().__init__(envelope)
        self.payloads = []

    def answer(self, payload):
        self.payloads.append(payload)
        return dict(self.envelope, payload=dict(self.envelope["payload"], run_id=payload["run_id"]))


@pytest.fixture
def answering(events_server):
    """An events app whose backend is answered by a fixed reply; set `.envelope` per test."""
    app = create_app(events_env(events_server, BUS_CONTAINERS_MAX_OUTPUT_BYTES="8"))
    bus = EchoRunBus(reply())
    app.extensions["bus_containers"].backend._bus = bus
    yield app, bus


@pytest.mark.parametrize("fields,expected", [
    ({"stdout": "0123456789", "stderr": "ok"},
     {"stdout": "01234567", "stdout_truncated": True, "stderr": "ok", "stderr_truncated": False}),
    ({"stdout": "ééééé", "stderr": "x" * 8},
     {"stdout": "éééé", "stdout_truncated": True, "stderr": "x" * 8, "stderr_truncated": False}),
    ({"stdout": "", "stderr": "", "stdout_truncated": True},
     {"stdout_truncated": True, "stderr_truncated": False}),
    ({"exit_code": 3, "timed_out": True}, {"status": "timed_out"}),
    ({"exit_code": 3}, {"status": "failed"}),
    ({"exit_code": 0, "status": "error"}, {"status": "error"}),
])
def test_answers_are_capped_and_carry_a_status(answering, fields, expected):
    app, bus = answering
    bus.envelope = reply(**fields)
    response = app.test_client().post(RUNS, headers=bearer(), json={"image": "alpine", "command": ["x"]})
    assert response.status_code == 200, response.text
    body = response.get_json()
    assert {key: body[key] for key in expected} == expected
    assert {"status", "stdout_truncated", "stderr_truncated"} <= set(body) and "timed_out" not in body
    assert bus.payloads[0]["max_output_bytes"] == 8


def test_env_and_stdin_go_to_the_backend(answering):
    app, bus = answering
    body = {"image": "alpine", "command": ["x"], "env": {"A_1": "v", "_B": ""}, "stdin": "in\nput"}
    assert app.test_client().post(RUNS, headers=bearer(), json=body).status_code == 200
    assert bus.payloads[0]["env"] == {"A_1": "v", "_B": ""} and bus.payloads[0]["stdin"] == "in\nput"


@pytest.mark.parametrize("extra", [
    {"env": {"1A": "v"}}, {"env": {"A-B": "v"}}, {"env": {"A\n": "v"}}, {"env": {"": "v"}},
    {"env": {"A": 1}}, {"env": ["A=1"]},
    {"env": {f"V{n}": "" for n in range(65)}}, {"env": {"BIG": "x" * (32 * 1024)}}, {"stdin": 5},
    {"stdin": None}, {"env": None}, {"command": ["x"] * 1025}, {"command": ["x" * (64 * 1024)] * 3},
])
def test_bad_env_stdin_and_command_are_400(client, extra):
    body = dict({"image": "alpine", "command": ["x"]}, **extra)
    response = client.post(RUNS, headers=bearer(), json=body)
    assert response.status_code == 400 and response.get_json()["error"]["type"] == "bad_request"


def test_the_limits_themselves_are_accepted(client):
    env_at_limit = {f"V{n:02d}": "" for n in range(64)}
    big = {"BIG": "x" * (32 * 1024 - 3)}
    for extra in ({"env": env_at_limit}, {"env": big}, {"command": ["x"] * 1024}, {"stdin": "x" * 500_000}):
        response = client.post(RUNS, headers=bearer(), json=dict({"image": "alpine", "command": ["x"]}, **extra))
        assert response.status_code == 200, (list(extra), response.text[:200])


MARK_NAME, MARK_VALUE, MARK_STDIN = "SECRET_NAME_4f1c", "secret-value-9d2e", "secret-stdin-77ab"


@pytest.mark.parametrize("app_env", [env(BUS_CONTAINERS_USAGE_BACKEND="memory")])
def test_env_and_stdin_appear_nowhere_else(app, client, caplog):
    caplog.set_level(logging.DEBUG)
    body = {"image": "alpine", "command": ["x"], "env": {MARK_NAME: MARK_VALUE}, "stdin": MARK_STDIN}
    answers = [client.post(RUNS, headers=bearer(), json=body),
               client.post(RUNS, headers={**bearer(), "Idempotency-Key": "k"}, json=body),
               client.post(RUNS, headers={**bearer(), "Idempotency-Key": "k"}, json=body)]
    bad = [client.post(RUNS, headers=bearer(), json=dict(body, env={MARK_NAME: 5})),
           client.post(RUNS, headers=bearer(), json=dict(body, env={MARK_VALUE + "-": "x"})),
           client.post(RUNS, headers=bearer(), json=dict(body, stdin=[MARK_STDIN]))]
    listed = client.get(RUNS, headers=bearer())
    records = app.extensions["bus_containers"].usage.records
    seen = [a.get_data(as_text=True) for a in answers + bad + [listed]] + [repr(records), caplog.text]
    seen.append(repr(app.extensions["bus_containers"].controls.store.__dict__))
    for text in seen:
        for mark in (MARK_NAME, MARK_VALUE, MARK_STDIN):
            assert mark not in text
    assert [a.status_code for a in answers + bad] == [200, 200, 200, 400, 400, 400]
