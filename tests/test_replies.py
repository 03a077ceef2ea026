"""How integration replies are read (CONTRACT §1, §3, §5, §6): each rule here once let a wrong reading pass.

These tests hand the reading code one fixed envelope (AnsweringBus); how
envelopes travel is tested against the real Events API in test_events.py.
"""
import sys
from pathlib import Path

import pytest

from bus_containers_provider import create_app
from bus_containers_provider.backends import RunRequest
from bus_containers_provider.controls import Key, RunControls
from bus_containers_provider.records import RunRecords
from bus_containers_provider.state.memory import MemoryStore
from bus_containers_provider.usage import NoUsage
from bus_containers_provider.backends.base import Backend
from bus_containers_provider.backends.events import EventsBackend
from bus_containers_provider.billing import EventsBilling
from bus_containers_provider.config import Settings, load_settings
from bus_containers_provider.errors import BadGateway, Unavailable
from bus_containers_provider.usage import EventsUsage
from buggy_app import buggy
from conftest import INTERNAL, AnsweringBus, bearer, env

SETTINGS = Settings(jwt_secret=b"x" * 32, request_timeout=7.0, run_timeout_grace=11.0, max_run_timeout=600.0)
RUN_RESULT = {"run_id": "run_1", "owner_account_id": "acct-a", "runner_name": "r", "image": "alpine",
              "args": ["true"], "exit_code": 0, "stdout": "", "stderr": "", "duration_ms": 1,
              "runtime": {"state": "ready", "provider": "r"}}
RUN = RunRequest(run_id="run_1", owner_account_id="acct-a", command=["true"], image="alpine")

# action -> (call, a well-formed payload for its reply)
ACTIONS = {
    "status": (lambda b: b.status("acct-a"), {"items": [{"id": "x", "state": "ready"}]}),
    "run": (lambda b: b.result(b._bus.request("bus.containers.run.request", {}, 1), "run_1"), RUN_RESULT),
    "delete": (lambda b: b.delete("acct-a", "run_1"),
               {"deleted": True, "run_id": "run_1", "owner_account_id": "acct-a"}),
    "runner_status": (lambda b: b.runner_status(), {"status": {"state": "ready", "provider": "r", "details": {}}}),
    "runner_start": (lambda b: b.runner_start(), {"accepted": True, "action": "start"}),
    "runner_delete": (lambda b: b.runner_delete(), {"deleted": True}),
}


class RecordingBus(AnsweringBus):
    """Answers like AnsweringBus and remembers what was asked and how long it would wait."""

    def __init__(self, envelope):
        super().__init__(envelope)
        self.calls = []

    def request(self, name, payload, timeout, **options):
        self.calls.append((name, payload, timeout))
        return self.envelope

    def publish(self, name, correlation_id, payload):
        self.calls.append((name, payload, None))
        super().publish(name, correlation_id, payload)


@pytest.mark.parametrize("action", sorted(ACTIONS))
def test_a_well_formed_reply_is_the_result(action):
    call, payload = ACTIONS[action]
    assert call(EventsBackend(AnsweringBus({"payload": payload}), SETTINGS)) is not None


@pytest.mark.parametrize("error", [{"type": "runner_failed", "message": "boom"}, {"code": "runner_failed"},
                                   {}, "boom", ["boom"], 5])
@pytest.mark.parametrize("action", sorted(ACTIONS))
def test_an_envelope_error_is_a_502_even_with_a_well_formed_payload(action, error):
    """§5: an envelope `error` fails the request, whatever the payload says."""
    call, payload = ACTIONS[action]
    with pytest.raises(BadGateway):
        call(EventsBackend(AnsweringBus({"payload": payload, "error": error}), SETTINGS))


def test_an_unowned_status_item_is_reduced_to_id_and_state():
    """§3: shared runner state is shown as id and state only; its details are not the caller's."""
    items = [{"id": "runner-1", "state": "ready", "details": {"host": "10.0.0.7", "accounts": ["acct-b"]}},
             {"id": "run_1", "state": "finished", "owner_account_id": "acct-a", "details": {"exit_code": 0}},
             {"id": "run_2", "state": "running", "owner_account_id": "acct-b", "details": {"exit_code": 1}}]
    backend = EventsBackend(AnsweringBus({"payload": {"items": items}}), SETTINGS)
    assert backend.status("acct-a") == [{"id": "runner-1", "state": "ready"}, items[1]]
    assert backend.runs("acct-a") == [items[1]]


def test_the_static_backend_reduces_unowned_items_through_the_same_rule():
    class Shared(Backend):
        def status_items(self, account):
            return [{"id": "pool", "state": "ready", "details": {"secret": "x"}}]

    assert Shared().status("acct-a") == [{"id": "pool", "state": "ready"}]


@pytest.mark.parametrize("body,wait", [
    ({}, 600.0 + 11.0),                       # no timeout_seconds: --max-run-timeout + grace
    ({"timeout_seconds": 0}, 600.0 + 11.0),   # 0 means the integration's limit: the same
    ({"timeout_seconds": 5}, 5 + 11.0),
])
def test_a_run_waits_its_timeout_plus_the_grace(body, wait):
    """§1: a run waits timeout_seconds + grace; with 0 or none, --max-run-timeout + grace."""
    bus = RecordingBus({"payload": RUN_RESULT})
    controls = RunControls(MemoryStore(), max_runs_per_account=0, run_capacity=1, idempotency_ttl=60)
    records = RunRecords(controls.store, EventsBackend(bus, SETTINGS), NoUsage(), controls, SETTINGS)
    live = records.open(RunRequest(run_id="run_1", owner_account_id="acct-a", command=["true"], profile="p", **body),
                        Key(), detached=True)
    [(name, payload, _)] = bus.calls
    assert name == "bus.containers.run.request"
    assert live.record["deadline"] - live.record["created"] == wait
    assert payload.get("timeout_seconds") == body.get("timeout_seconds")
    records.stop(hand_over=False)


@pytest.mark.parametrize("action", ["status", "delete", "runner_status", "runner_start", "runner_delete"])
def test_other_requests_wait_the_request_timeout(action):
    call, payload = ACTIONS[action]
    bus = RecordingBus({"payload": payload})
    call(EventsBackend(bus, SETTINGS))
    assert [timeout for _, _, timeout in bus.calls] == [7.0]


@pytest.mark.parametrize("payload", [{"recorded": False}, {"recorded": False, "event_id": "e"}])
def test_a_usage_reply_with_recorded_false_is_not_a_record(payload):
    """§6 fail-safe: a refused record means no run."""
    with pytest.raises(Unavailable):
        EventsUsage(AnsweringBus({"payload": payload}), 1).record({"event_id": "e", "data": {"run_id": "run_1"}})


@pytest.mark.parametrize("payload", [{"recorded": True}, {"recorded": True, "event_id": "e"}])
def test_a_usage_reply_with_recorded_true_is_a_record(payload):
    EventsUsage(AnsweringBus({"payload": payload}), 1).record({"event_id": "e", "data": {"run_id": "run_1"}})


@pytest.mark.parametrize("payload", [{}, {"reason": "setup_billing"}, {"allowed": None}, {"allowed": 1},
                                     {"allowed": "true"}, {"command": "bus billing setup"}])
def test_a_billing_reply_without_a_boolean_allowed_is_malformed(payload):
    """§5/§6: no `allowed`, no run, and not a denial either: a 502."""
    with pytest.raises(BadGateway):
        EventsBilling(AnsweringBus({"payload": payload}), 1).check("acct-a")


def test_a_billing_reply_that_allows_lets_the_run_through():
    assert EventsBilling(AnsweringBus({"payload": {"allowed": True}}), 1).check("acct-a") is None


def test_the_events_backend_serves_with_two_workers_and_static_with_one():
    """§1: --workers defaults to 2, and to 1 with the static backend (§4)."""
    events = dict(env(), BUS_CONTAINERS_BACKEND="events", BUS_EVENTS_API_URL="http://127.0.0.1:9",
                  BUS_API_TOKEN="t")
    assert load_settings(events).effective_workers == 2
    assert load_settings(env()).effective_workers == 1
    assert load_settings(dict(env(), BUS_CONTAINERS_WORKERS="3")).effective_workers == 3
    assert load_settings(dict(events, BUS_CONTAINERS_WORKERS="1")).effective_workers == 1


UNEXPECTED = [
    ("GET", "/api/v1/containers/status", None),
    ("GET", "/api/v1/containers/runs", None),
    ("GET", "/api/v1/containers/runs/run_1", None),
    ("DELETE", "/api/v1/containers/runs/run_1", None),
    ("POST", "/api/v1/containers/runs", {"profile": "codex"}),
    ("GET", "/api/internal/containers/runner", "internal"),
    ("POST", "/api/internal/containers/runner", "internal"),
    ("DELETE", "/api/internal/containers/runner", "internal"),
]


@pytest.mark.parametrize("method,path,extra", UNEXPECTED)
def test_an_unexpected_error_is_the_json_envelope_not_an_html_page(method, path, extra, caplog):
    """§3: even a bug answers with the error envelope; it is logged whole, never shown."""
    app = buggy(create_app(env()))
    headers = bearer("operator", "container:admin", INTERNAL) if extra == "internal" else bearer()
    response = app.test_client().open(path, method=method, headers=headers,
                                      json=extra if isinstance(extra, dict) else None)
    assert response.status_code == 500
    assert response.mimetype == "application/json"
    assert response.get_json() == {"error": {"type": "internal_error", "message": "internal error"}}
    assert b"secret" not in response.data and b"RuntimeError" not in response.data
    assert "RuntimeError: a bug with a secret" in caplog.text  # logged with its traceback for the operator


@pytest.mark.timeout(60)
def test_an_unexpected_error_through_gunicorn_is_the_json_envelope():
    import requests

    from processes import ROOT, free_port, provider_env, running

    port = free_port()
    gunicorn = str(Path(sys.executable).parent / "gunicorn")
    command = [gunicorn, "-c", "gunicorn.conf.py", "--pythonpath", str(ROOT / "tests"), "buggy_app:app"]
    with running(command, dict(provider_env(), BUS_CONTAINERS_ADDR=f"127.0.0.1:{port}"), port) as process:
        response = requests.get(f"{process.url}/api/v1/containers/status", headers=bearer(), timeout=10)
    assert response.status_code == 500
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == {"error": {"type": "internal_error", "message": "internal error"}}
    assert "RuntimeError: a bug with a secret" in process.output


@pytest.mark.parametrize("flag", ["timed_out", "stdout_truncated", "stderr_truncated"])
@pytest.mark.parametrize("value", [1, 0, "true", None])
def test_a_run_reply_flag_must_be_a_json_boolean(flag, value):
    """§3: a wrongly typed field is a malformed reply (502); 1 == True must not pass for true."""
    with pytest.raises(BadGateway):
        ACTIONS["run"][0](EventsBackend(AnsweringBus({"payload": {**RUN_RESULT, flag: value}}), SETTINGS))
