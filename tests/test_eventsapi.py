"""The test Events API and Responder, checked as components over real sockets."""

import json
import queue
import threading
import time
import uuid

import pytest
import requests

# tests/ is not a package, so pytest puts it on sys.path (as conftest does).
from eventsapi import EventsServer, Responder, close_stream

# Every test here waits on a provider, a stream or a server: a lost reply fails it at this bound.
pytestmark = pytest.mark.timeout(30)

PUBLISH = "/api/v1/events"
STREAM = "/api/v1/events/stream"
WAIT = 5.0


def auth(token="tok"):
    return {"Authorization": f"Bearer {token}"}


class Reader:
    """A stream read on a daemon thread; envelopes land in a queue."""

    def __init__(self, base_url, token="tok", **params):
        self.envelopes = queue.Queue()
        self.ended = threading.Event()
        self.resp = requests.get(base_url + STREAM, params=params, headers=auth(token),
                                 stream=True, timeout=(2, 10))
        self.status = self.resp.status_code
        self.thread = threading.Thread(target=self._read, daemon=True)
        if self.status == 200:
            self.thread.start()
        else:
            self.resp.close()
            self.ended.set()

    def _read(self):
        buffer = b""
        try:
            for chunk in self.resp.iter_content(chunk_size=None):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        self.envelopes.put(json.loads(line))
        except requests.RequestException:
            pass  # an abrupt end of the stream is what some tests provoke
        finally:
            self.ended.set()

    def next(self, timeout=WAIT):
        return self.envelopes.get(timeout=timeout)

    def find(self, correlation_id, timeout=WAIT):
        while True:
            envelope = self.next(timeout)
            key = envelope.get("correlationId", envelope.get("correlation_id"))
            if key == correlation_id:
                return envelope

    def drain(self):
        items = []
        while not self.envelopes.empty():
            items.append(self.envelopes.get_nowait())
        return items

    def close(self):
        close_stream(self.resp)
        if self.thread.is_alive():
            self.thread.join(WAIT)


@pytest.fixture
def server():
    events = EventsServer(tokens={"tok": None, "usage-only": ["bus.usage"]})
    events.start()
    try:
        yield events
    finally:
        events.stop()


@pytest.fixture
def stream(server):
    readers = []

    def open_stream(name, token="tok", **params):
        reader = Reader(server.url, token, name=name, **params)
        readers.append(reader)
        return reader

    try:
        yield open_stream
    finally:
        for reader in readers:
            reader.close()


@pytest.fixture
def responder(server):
    worker = Responder(server.url, "tok")
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()


def publish(server, body, token="tok"):
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return requests.post(server.url + PUBLISH, data=data, timeout=WAIT,
                         headers={**auth(token), "Content-Type": "application/json"})


def request_reply(server, stream, name, payload):
    """Publish a request and return its reply, as the provider would see it."""
    replies = stream(name.replace(".request", ".response"))
    correlation_id = str(uuid.uuid4())
    resp = publish(server, {"name": name, "correlationId": correlation_id,
                            "payload": payload})
    assert resp.status_code == 202
    return replies.find(correlation_id), replies


# -- publish ---------------------------------------------------------------

def test_publish_is_accepted_and_recorded(server):
    first = publish(server, {"name": "bus.test.one", "correlationId": "c1",
                             "payload": {"a": 1}})
    second = publish(server, {"name": "bus.test.two", "payload": {}})
    assert first.status_code == 202
    body = first.json()
    assert body["accepted"] is True and body["name"] == "bus.test.one"
    assert body["id"] != second.json()["id"]
    [stored] = server.published("bus.test.one")
    assert stored["id"] == body["id"]
    assert stored["correlationId"] == "c1" and stored["payload"] == {"a": 1}
    assert len(server.published()) == 2


@pytest.mark.parametrize("body", [
    "{not json",
    "[1, 2]",
    {"payload": {}},
    {"name": "Bus.Upper", "payload": {}},
    {"name": "bus.*", "payload": {}},
    {"name": "bus..empty", "payload": {}},
    {"name": "bus.trailing.", "payload": {}},
    {"name": 5, "payload": {}},
    {"name": "bus.ok", "payload": [1]},
    {"name": "bus.ok"},
    {"name": "bus.ok", "payload": {}, "error": "boom"},
])
def test_publish_rejects_bad_bodies(server, body):
    resp = publish(server, body)
    assert resp.status_code == 400
    assert resp.json()["error"]["type"] == "bad_request"
    assert server.published() == []


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"},
                                     {"Authorization": "Basic tok"}])
def test_publish_needs_a_valid_bearer(server, headers):
    resp = requests.post(server.url + PUBLISH, json={"name": "bus.a", "payload": {}},
                         headers=headers, timeout=WAIT)
    assert resp.status_code == 401
    assert resp.json()["error"]["type"] == "invalid_auth"


def test_token_limited_to_prefixes(server):
    assert publish(server, {"name": "bus.usage.record.request", "payload": {}},
                   token="usage-only").status_code == 202
    denied = publish(server, {"name": "bus.usageless", "payload": {}}, token="usage-only")
    assert denied.status_code == 403
    assert denied.json()["error"]["type"] == "forbidden"


def test_fault_controls(server):
    server.fail_publish(503)
    assert publish(server, {"name": "bus.a", "payload": {}}).status_code == 503
    server.fail_streams(503)
    assert Reader(server.url, name="bus.a").status == 503
    server.reset_faults()
    assert publish(server, {"name": "bus.a", "payload": {}}).status_code == 202
    assert len(server.published("bus.a")) == 1
    server.delay_publish(0.05)
    assert publish(server, {"name": "bus.a", "payload": {}}).status_code == 202


# -- streams ---------------------------------------------------------------

@pytest.mark.parametrize("token, params, status", [
    ("nope", {"name": "bus.a"}, 401),
    ("tok", {"name": "bus.>"}, 400),
    ("tok", {}, 400),
    ("tok", {"name": "bus.a", "delivery": "multicast"}, 400),
    ("tok", {"name": "bus.a", "delivery": "unicast"}, 400),
    ("usage-only", {"name": "bus.containers.run.response"}, 403),
])
def test_stream_refusals(server, token, params, status):
    resp = requests.get(server.url + STREAM, params=params, headers=auth(token),
                        timeout=WAIT)
    assert resp.status_code == status
    assert "error" in resp.json()
    assert server.open_streams() == 0


def test_stream_answers_are_recorded_refusals_included_and_tokens_can_be_replaced(server, stream):
    stream("bus.a")
    assert Reader(server.url, token="nope", name="bus.a").status == 401
    server.accept_tokens({"new": None})
    assert Reader(server.url, name="bus.a").status == 401
    assert Reader(server.url, name="bus.b").status == 401
    assert publish(server, {"name": "bus.a", "payload": {}}).status_code == 401
    kept = Reader(server.url, token="new", name="bus.a")
    assert kept.status == 200 and publish(server, {"name": "bus.a", "payload": {}}, token="new").status_code == 202
    assert kept.next()["name"] == "bus.a"
    assert [status for _, status in server.stream_answers("bus.a")] == [200, 401, 401, 200]
    assert [status for _, status in server.stream_answers()] == [200, 401, 401, 401, 200]
    times = [at for at, _ in server.stream_answers()]
    assert times == sorted(times)
    server.clear()
    assert server.stream_answers() == []


def test_broadcast_reaches_every_listener(server, stream):
    first, second = stream("bus.cast"), stream("bus.cast")
    assert first.resp.headers["Content-Type"] == "application/x-ndjson"
    assert first.resp.headers["Transfer-Encoding"] == "chunked"
    publish(server, {"name": "bus.cast", "correlationId": "x", "payload": {"n": 1}})
    for reader in (first, second):
        envelope = reader.next()
        assert envelope["correlationId"] == "x" and envelope["payload"] == {"n": 1}


def test_line_arrives_while_stream_stays_open(server, stream):
    reader = stream("bus.prompt")
    publish(server, {"name": "bus.prompt", "payload": {}})
    assert reader.next(timeout=2.0)["name"] == "bus.prompt"
    assert not reader.ended.is_set()


def test_unicast_gives_each_event_to_one_consumer(server, stream):
    readers = [stream("bus.work", delivery="unicast", group="g", consumer=c)
               for c in ("c1", "c2")]
    sent = []
    for n in range(6):
        sent.append(publish(server, {"name": "bus.work", "payload": {"n": n}}).json()["id"])
    got = []
    for _ in sent:
        got.append(next_from_any(readers))
    assert sorted(got) == sorted(sent)
    assert all(r.drain() == [] for r in readers)
    assert server.published("bus.work")[0]["payload"] == {"n": 0}


def next_from_any(readers, timeout=WAIT):
    """The id of the next envelope any reader gets; bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for reader in readers:
            try:
                return reader.next(timeout=0.05)["id"]
            except queue.Empty:
                pass
    raise AssertionError("no reader got an event")


def test_unicast_round_robin_uses_both_consumers(server, stream):
    readers = [stream("bus.rr", delivery="unicast", group="g") for _ in range(2)]
    for n in range(4):
        publish(server, {"name": "bus.rr", "payload": {"n": n}})
    counts = [len([reader.next() for _ in range(2)]) for reader in readers]
    assert counts == [2, 2]


def test_unicast_keeps_events_while_the_group_has_no_consumer(server, stream):
    stream("bus.later", delivery="unicast", group="g").close()
    assert server.wait_for_streams(0)
    publish(server, {"name": "bus.later", "correlationId": "kept", "payload": {}})
    late = stream("bus.later", delivery="unicast", group="g")
    assert late.next()["correlationId"] == "kept"


def test_replay_without_follow_returns_history_and_ends(server):
    for n in range(3):
        publish(server, {"name": "bus.hist", "payload": {"n": n}})
    publish(server, {"name": "bus.other", "payload": {}})
    resp = requests.get(server.url + STREAM, headers=auth(), timeout=WAIT,
                        params={"name": "bus.hist", "replay": "true", "follow": "false"})
    assert resp.status_code == 200
    lines = [json.loads(line) for line in resp.content.splitlines()]
    assert [e["payload"]["n"] for e in lines] == [0, 1, 2]
    assert all("publisher_token" not in e for e in lines)
    assert server.streams_opened("bus.hist") == 1


def test_open_stream_count_follows_the_client(server, stream):
    reader = stream("bus.count")
    assert server.wait_for_streams(1, name="bus.count")
    assert server.streams_opened("bus.count") == 1
    reader.close()
    assert server.wait_for_streams(0, name="bus.count")
    assert server.streams_opened("bus.count") == 1


def test_drop_streams_ends_the_reader(server, stream):
    reader = stream("bus.drop")
    assert server.wait_for_streams(1)
    assert server.drop_streams("bus.drop") == 1
    assert reader.ended.wait(WAIT)
    assert server.wait_for_streams(0)


def test_stop_and_start_on_the_same_port(server, stream):
    publish(server, {"name": "bus.keep", "payload": {}})
    reader = stream("bus.keep")
    port = server.port
    server.stop()
    assert reader.ended.wait(WAIT)
    assert server.open_streams() == 0
    with pytest.raises(requests.ConnectionError):
        publish(server, {"name": "bus.keep", "payload": {}})
    server.start()
    assert server.port == port
    assert publish(server, {"name": "bus.keep", "payload": {}}).status_code == 202
    assert len(server.published("bus.keep")) == 2


def test_snake_case_correlation_is_streamed_as_sent(server, stream):
    reader = stream("bus.snake")
    publish(server, {"name": "bus.snake", "correlation_id": "s1", "payload": {},
                     "error": {"type": "x", "message": "y"}})
    envelope = reader.next()
    assert envelope["correlation_id"] == "s1" and "correlationId" not in envelope
    assert envelope["error"] == {"type": "x", "message": "y"}


# -- responder -------------------------------------------------------------

RUN = "bus.containers.run.request"


def run_payload(profile=None, owner="acct-1"):
    payload = {"run_id": f"run_{uuid.uuid4().hex[:8]}", "owner_account_id": owner,
               "command": ["echo", "hi"], "timeout_seconds": 5}
    if profile is not None:
        payload["profile"] = profile
    return payload


def test_responder_answers_a_run(server, stream, responder):
    payload = run_payload()
    reply, _ = request_reply(server, stream, RUN, payload)
    assert reply["name"] == "bus.containers.run.response"
    assert "error" not in reply
    result = reply["payload"]
    assert result["run_id"] == payload["run_id"]
    assert result["owner_account_id"] == "acct-1"
    assert result["args"] == ["echo", "hi"] and result["stdout"] == "echo hi"
    assert result["exit_code"] == 0 and isinstance(result["duration_ms"], int)
    assert result["runtime"] == {"state": "ready", "provider": "responder"}
    assert responder.received(RUN)[0]["payload"] == payload


def test_responder_never_stays_silent(server, stream, responder):
    replies = stream("bus.containers.run.response")
    publish(server, {"name": RUN, "correlationId": "silent", "payload": run_payload("never")})
    publish(server, {"name": RUN, "correlationId": "loud", "payload": run_payload()})
    # Requests on one stream are handled in order, so once "loud" is answered
    # a reply to "silent" would already have been published.
    assert replies.next()["correlationId"] == "loud"
    assert replies.drain() == []


def test_responder_holds_a_reply_until_it_is_released(server, stream, responder):
    replies = stream("bus.containers.run.response")
    held = run_payload("hold:h1")
    publish(server, {"name": RUN, "correlationId": "held", "payload": held})
    deadline = time.monotonic() + WAIT
    while responder.held("h1") < 1:
        assert time.monotonic() < deadline, "the held run was not received"
        time.sleep(0.02)
    # Another run is answered meanwhile, and the held one is not (requests on a stream are in order).
    publish(server, {"name": RUN, "correlationId": "loud", "payload": run_payload()})
    assert replies.next()["correlationId"] == "loud"
    assert replies.drain() == []

    assert responder.release("h1") == 1
    reply = replies.next()
    assert reply["correlationId"] == "held"
    assert reply["payload"]["run_id"] == held["run_id"] and reply["payload"]["stdout"] == "echo hi"
    assert responder.held("h1") == 0
    # Once released, a run held under that name is answered at once.
    publish(server, {"name": RUN, "correlationId": "late", "payload": run_payload("hold:h1")})
    assert replies.next()["correlationId"] == "late"


@pytest.mark.parametrize("profile, check", [
    ("error", lambda r: r["error"] == {"type": "runner_failed", "message": "boom"}
     and r["payload"] == {}),
    ("malformed", lambda r: r["payload"] == {"run_id": 5}),
    ("wrong-owner", lambda r: r["payload"]["owner_account_id"] == "someone-else"),
    ("owner-identity", lambda r: r["payload"]["owner_identity_id"] == "acct-1"
     and "owner_account_id" not in r["payload"]),
    ("exit:3", lambda r: r["payload"]["exit_code"] == 3 and r["payload"]["stderr"]),
    ("sleep:0.2", lambda r: r["payload"]["duration_ms"] >= 200),
])
def test_responder_run_profiles(server, stream, responder, profile, check):
    reply, _ = request_reply(server, stream, RUN, run_payload(profile))
    assert check(reply)


def test_responder_snake_correlation(server, stream, responder):
    reply, _ = request_reply(server, stream, RUN, run_payload("snake-correlation"))
    assert "correlationId" not in reply and reply["correlation_id"]


def test_responder_status_and_delete(server, stream, responder):
    payload = run_payload()
    request_reply(server, stream, RUN, payload)
    status, _ = request_reply(server, stream, "bus.containers.status.request",
                              {"owner_account_id": "acct-1"})
    ids = {item["id"]: item for item in status["payload"]["items"]}
    assert ids[payload["run_id"]]["owner_account_id"] == "acct-1"
    assert ids["run_other"]["owner_account_id"] == "someone-else"
    assert "owner_account_id" not in ids["runner-1"]

    delete = "bus.containers.delete.request"
    theirs, _ = request_reply(server, stream, delete,
                              {"run_id": payload["run_id"], "owner_account_id": "acct-2"})
    # Another owner's run is as unknown as a missing one, and stays.
    assert theirs["error"]["type"] == "not_found"
    assert "acct-1" not in json.dumps(theirs)
    mine, _ = request_reply(server, stream, delete,
                            {"run_id": payload["run_id"], "owner_account_id": "acct-1"})
    assert mine["payload"] == {"deleted": True, "run_id": payload["run_id"],
                               "owner_account_id": "acct-1"}
    gone, _ = request_reply(server, stream, delete,
                            {"run_id": payload["run_id"], "owner_account_id": "acct-1"})
    assert gone["error"]["type"] == "not_found"


def test_responder_usage_billing_and_modes(server, stream, responder):
    usage = {"event_type": "container_run_requested", "event_id": "r:x",
             "account_id": "acct-1", "occurred_at": "now", "data": {}}
    reply, _ = request_reply(server, stream, "bus.usage.record.request", usage)
    assert reply["payload"] == {"recorded": True, "event_id": "r:x"}
    assert responder.usage_records == [usage]

    responder.usage_mode = "error"
    reply, _ = request_reply(server, stream, "bus.usage.record.request", usage)
    assert reply["error"]["type"] == "worker_failed"

    billing = "bus.billing.entitlement.check.request"
    reply, _ = request_reply(server, stream, billing, {"account_id": "acct-1"})
    assert reply["payload"] == {"allowed": True}
    responder.billing["acct-2"] = {"allowed": False, "reason": "setup_billing",
                                   "command": "bus billing setup"}
    reply, _ = request_reply(server, stream, billing, {"account_id": "acct-2"})
    assert reply["payload"]["reason"] == "setup_billing"

    responder.modes["bus.containers.runner.status.request"] = "malformed"
    reply, _ = request_reply(server, stream, "bus.containers.runner.status.request", {})
    assert reply["payload"] == {"status": "nope"}


def test_responder_survives_a_server_restart(server, stream, responder):
    names = len(responder.names)
    assert server.wait_for_streams(names)
    server.stop()
    server.start()
    assert server.wait_for_streams(names)
    reply, _ = request_reply(server, stream, "bus.containers.runner.start.request", {})
    assert reply["payload"] == {"accepted": True, "action": "start"}


def test_responder_stop_closes_its_streams(server):
    worker = Responder(server.url, "tok").start()
    assert server.open_streams() == len(worker.names)
    worker.stop()
    assert server.wait_for_streams(0)
