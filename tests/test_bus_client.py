"""Events client error paths (responses) and the waiter registry as units."""
import json
import logging
import re
import threading
import time

import pytest
import requests
import responses

from bus_containers_provider.bus.client import (
    MAX_LINE_BYTES, EventsClient, EventsRejected, EventsUnavailable, ListenerDown, ReplyTimeout,
)
from bus_containers_provider.bus.replies import ReplyRegistry

# Every test here waits on a provider, a stream or a server: a lost reply fails it at this bound.
pytestmark = pytest.mark.timeout(30)

BASE = "http://events.test"
PUBLISH = f"{BASE}/api/v1/events"
STREAM = f"{BASE}/api/v1/events/stream"
TOKEN = "secret-provider-token"


@pytest.fixture
def client():
    events = EventsClient(BASE, TOKEN, connect_timeout=1, publish_timeout=1)
    yield events
    events.close()


@responses.activate
def test_publish_sends_the_envelope_with_the_bearer(client):
    responses.post(PUBLISH, status=202, json={"accepted": True, "id": "1", "name": "a.request"})
    client.publish("a.request", "cid-1", {"x": 1})
    sent = responses.calls[0].request
    assert json.loads(sent.body) == {"name": "a.request", "correlationId": "cid-1", "payload": {"x": 1}}
    assert sent.headers["Authorization"] == f"Bearer {TOKEN}"


@responses.activate
@pytest.mark.parametrize("failure,expected", [
    (requests.ConnectionError("refused"), EventsUnavailable),
    (requests.ConnectTimeout("slow"), EventsUnavailable),
    (requests.ReadTimeout("slow"), EventsUnavailable),
])
def test_publish_transport_failures_are_unavailable(client, failure, expected):
    responses.post(PUBLISH, body=failure)
    with pytest.raises(expected) as raised:
        client.publish("a.request", "cid", {})
    assert TOKEN not in str(raised.value)


@responses.activate
@pytest.mark.parametrize("status,expected,unauthorized,malformed", [
    (400, EventsRejected, False, True), (401, EventsRejected, True, False), (403, EventsRejected, True, False),
    (404, EventsRejected, False, True), (429, EventsRejected, False, False), (201, EventsUnavailable, None, None),
    (500, EventsUnavailable, None, None), (503, EventsUnavailable, None, None),
])
def test_publish_statuses(client, status, expected, unauthorized, malformed):
    responses.post(PUBLISH, status=status, json={"error": "no"})
    with pytest.raises(expected) as raised:
        client.publish("a.request", "cid", {})
    if unauthorized is not None:
        assert raised.value.unauthorized is unauthorized and raised.value.status == status
        assert raised.value.malformed is malformed


@responses.activate
def test_stream_yields_envelopes_and_skips_junk(client):
    lines = [
        json.dumps({"id": "1", "name": "a.response", "correlationId": "c1", "payload": {"s": "x\u2028y"}},
                   ensure_ascii=False),
        "not json", "[1, 2]", "", '{"id": "x", "payload": {"n": NaN}}', '{"id": "y", "payload": Infinity}',
        "[" * 200_000,  # nested past the parser's recursion limit, far under the line cap
        json.dumps({"id": "2", "name": "a.response", "correlation_id": "c2", "payload": {}}),
    ]
    responses.get(STREAM, body="\n".join(lines).encode() + b"\n", content_type="application/x-ndjson")
    envelopes = list(client.stream("a.response", idle_timeout=1))
    assert [e["id"] for e in envelopes] == ["1", "2"]
    assert envelopes[0]["payload"]["s"] == "x\u2028y"
    assert "name=a.response" in responses.calls[0].request.url
    assert "delivery=broadcast" in responses.calls[0].request.url


@responses.activate
@pytest.mark.parametrize("status,expected", [(401, EventsRejected), (403, EventsRejected), (400, EventsRejected),
                                             (502, EventsUnavailable)])
def test_stream_refusals(client, status, expected):
    responses.get(STREAM, status=status)
    with pytest.raises(expected):
        list(client.stream("a.response", idle_timeout=1))


@responses.activate
def test_stream_connection_failure_is_unavailable(client):
    responses.get(STREAM, body=requests.ConnectionError("refused"))
    with pytest.raises(EventsUnavailable):
        list(client.stream("a.response", idle_timeout=1))


def test_the_line_limit_is_the_contracts_16_mib():
    assert MAX_LINE_BYTES == 16 * 1024 * 1024


@responses.activate
@pytest.mark.parametrize("extra", [70_000, 1])
def test_a_line_over_the_limit_is_discarded_and_the_stream_carries_on(client, caplog, extra):
    before = json.dumps({"id": "1", "correlationId": "c1", "payload": {}}).encode()
    after = json.dumps({"id": "2", "correlationId": "c2", "payload": {}}).encode()
    exact = json.dumps({"id": "3", "payload": {"s": "y" * (MAX_LINE_BYTES - 100)}}).encode()
    exact = exact + b" " * (MAX_LINE_BYTES - len(exact))  # exactly at the limit: still a reply
    body = b"\n".join([before, b"x" * (MAX_LINE_BYTES + extra), after, exact]) + b"\n"
    responses.get(STREAM, body=body)
    assert [e["id"] for e in client.stream("a.response", idle_timeout=1)] == ["1", "2", "3"]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "discarding a line over 16777216 bytes on the a.response stream"]


def test_repr_never_shows_the_token(client):
    assert TOKEN not in repr(client)


@responses.activate
def test_publishes_borrow_an_idle_session_and_never_share_one_in_use(client):
    in_flight, second_done = threading.Event(), threading.Event()
    used = []

    def accept(request):
        used.append(threading.current_thread().name)
        if len(used) == 1:  # the first publish stays in flight until the second one is done
            in_flight.set()
            assert second_done.wait(10)
        return 202, {}, json.dumps({"accepted": True})

    responses.add_callback(responses.POST, PUBLISH, callback=accept)
    first = threading.Thread(target=client.publish, args=("a.request", "c1", {}), name="first")
    first.start()
    assert in_flight.wait(10)
    client.publish("a.request", "c2", {})  # the first one's session is taken: a second is made
    second_done.set()
    first.join(10)
    assert len(client._sessions) == 2
    for n in range(3):  # one at a time, from other threads: the idle sessions are reused
        worker = threading.Thread(target=client.publish, args=("a.request", f"c{n + 3}", {}))
        worker.start()
        worker.join(10)
    assert len(client._sessions) == 2 and len(used) == 5


def test_stream_sessions_are_per_thread(client):
    sessions = []
    threads = [threading.Thread(target=lambda: sessions.append(client._session())) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert len({id(s) for s in sessions}) == 3


class TestRegistry:
    def test_reply_reaches_its_waiter_once(self):
        registry = ReplyRegistry()
        waiter = registry.register("a.response", "c1")
        assert registry.resolve("a.response", {"correlationId": "c1", "payload": {"n": 1}})
        assert not registry.resolve("a.response", {"correlationId": "c1", "payload": {"n": 2}})
        assert waiter.wait(1)["payload"] == {"n": 1}
        assert registry.pending() == 0

    def test_unknown_other_name_and_malformed_replies_are_dropped(self):
        registry = ReplyRegistry()
        waiter = registry.register("a.response", "c1")
        assert not registry.resolve("a.response", {"correlationId": "nobody"})
        assert not registry.resolve("b.response", {"correlationId": "c1"})
        assert not registry.resolve("a.response", {"correlationId": 5})
        assert not registry.resolve("a.response", {})
        assert registry.pending() == 1
        registry.discard(waiter)
        assert registry.pending() == 0
        assert not registry.resolve("a.response", {"correlationId": "c1"})  # late

    def test_wait_times_out(self):
        registry = ReplyRegistry()
        waiter = registry.register("a.response", "c1")
        with pytest.raises(ReplyTimeout):
            waiter.wait(0.05)

    def test_mark_down_fails_waiters_of_that_name_and_refuses_new_ones(self):
        registry = ReplyRegistry()
        a = registry.register("a.response", "c1")
        b = registry.register("b.response", "c2")
        registry.mark_down("a.response", "stream ended")
        with pytest.raises(ListenerDown):
            a.wait(1)
        with pytest.raises(ListenerDown):
            registry.register("a.response", "c3")
        assert registry.pending() == 1 and registry.resolve("b.response", {"correlationId": "c2"})
        assert b.wait(1) == {"correlationId": "c2"}
        registry.mark_up("a.response")
        assert registry.register("a.response", "c4")

    def test_mark_down_while_reconnecting_keeps_waiters_and_refuses_new_ones(self):
        registry = ReplyRegistry()
        waiting = registry.register("a.response", "c1")
        registry.mark_down("a.response", "stream ended", fail_waiting=False)
        with pytest.raises(ListenerDown):
            registry.register("a.response", "c2")
        assert registry.pending("a.response") == 1
        registry.mark_up("a.response")
        assert registry.resolve("a.response", {"correlationId": "c1", "payload": {"n": 1}})
        assert waiting.wait(1)["payload"] == {"n": 1}

    def test_first_reply_wins_and_copies_are_dropped_silently(self, caplog):
        caplog.set_level(logging.INFO)
        registry = ReplyRegistry()
        waiter = registry.register("a.response", "c1")
        assert registry.resolve("a.response", {"correlationId": "c1", "payload": {"n": 1}})
        registry.discard(waiter)
        assert not registry.resolve("a.response", {"correlationId": "c1", "payload": {"n": 2}})
        assert waiter.wait(0)["payload"] == {"n": 1}
        assert caplog.records == []

    def test_a_late_reply_is_logged_once_by_name_and_correlation_id_never_its_payload(self, caplog):
        caplog.set_level(logging.INFO)
        registry = ReplyRegistry()
        waiter = registry.register("a.response", "c1")
        with pytest.raises(ReplyTimeout):
            waiter.wait(0.01)
        registry.discard(waiter)
        late = {"correlationId": "c1", "payload": {"stdout": "private-output"}}
        assert not registry.resolve("a.response", late)
        assert not registry.resolve("a.response", late)
        [record] = caplog.records
        assert record.levelno == logging.INFO
        assert record.getMessage() == "late a.response reply for correlation id c1: its request no longer waits"
        assert "private-output" not in caplog.text
        assert not registry.resolve("a.response", {"correlationId": "never-ours"})  # another process's
        assert len(caplog.records) == 1

    def test_a_snake_case_correlation_id_reaches_its_waiter(self):
        registry = ReplyRegistry()
        waiter = registry.register("a.response", "c1")
        assert registry.resolve("a.response", {"correlation_id": "c1", "payload": {"n": 1}})
        assert waiter.wait(1)["payload"] == {"n": 1}

    def test_a_waiter_failed_by_mark_down_has_its_late_reply_logged_once(self, caplog):
        caplog.set_level(logging.INFO)
        registry = ReplyRegistry()
        waiter = registry.register("a.response", "c1")
        registry.mark_down("a.response", "stream ended")
        with pytest.raises(ListenerDown, match=re.escape("the a.response listener is not connected (stream ended)")):
            waiter.wait(1)
        registry.discard(waiter)
        for _ in range(2):
            assert not registry.resolve("a.response", {"correlationId": "c1", "payload": {}})
        assert [r.getMessage() for r in caplog.records] == [
            "late a.response reply for correlation id c1: its request no longer waits"]

    def test_the_oldest_ended_waits_are_forgotten_first(self, caplog, monkeypatch):
        from bus_containers_provider.bus import replies

        monkeypatch.setattr(replies, "REMEMBERED", 2)
        caplog.set_level(logging.INFO)
        registry = ReplyRegistry()
        for cid in ("c1", "c2", "c3"):
            waiter = registry.register("a.response", cid)
            with pytest.raises(ReplyTimeout):
                waiter.wait(0)
            registry.discard(waiter)
        for cid in ("c1", "c2", "c3"):
            registry.resolve("a.response", {"correlationId": cid})
        # c1 was forgotten: its late reply reads as another process's, dropped without a word.
        assert [r.getMessage() for r in caplog.records] == [
            f"late a.response reply for correlation id {cid}: its request no longer waits" for cid in ("c2", "c3")]

    def test_answered_ids_count_among_those_remembered(self, caplog, monkeypatch):
        from bus_containers_provider.bus import replies

        monkeypatch.setattr(replies, "REMEMBERED", 2)
        caplog.set_level(logging.INFO)
        registry = ReplyRegistry()
        expired = registry.register("a.response", "c1")
        with pytest.raises(ReplyTimeout):
            expired.wait(0)
        registry.discard(expired)
        for cid in ("c2", "c3"):  # two answered after it push c1 out
            answered = registry.register("a.response", cid)
            assert registry.resolve("a.response", {"correlationId": cid})
            registry.discard(answered)
        assert not registry.resolve("a.response", {"correlationId": "c1"})
        assert caplog.records == []


class TestUnwanted:
    """The registry's check that lets a stream reader drop another process's reply without parsing it."""

    @pytest.fixture
    def registry(self):
        registry = ReplyRegistry()
        registry.register("a.response", "ours")
        return registry

    @staticmethod
    def line(**envelope) -> bytes:
        return json.dumps({"id": "1", "name": "a.response", **envelope}, separators=(",", ":")).encode()

    def test_another_process_reply_is_unwanted(self, registry):
        assert registry.unwanted(self.line(correlationId="theirs", payload={"stdout": "x"}))
        assert registry.unwanted(b'{"correlation_id" : "theirs", "payload": {}}')

    @pytest.mark.parametrize("line", [
        # Our own id, at the top level or only nested (the parse decides which key counts).
        b'{"correlationId":"ours","payload":{}}',
        b'{"payload":{"correlationId":"theirs"},"correlationId":"ours"}',
        b'{"correlationId":"theirs","payload":{"correlation_id":"ours"}}',
        # An escaped value, or a \\u escape anywhere: a key could be spelt with one.
        b'{"correlationId":"th\\"eirs","payload":{}}',
        b'{"correlation\\u0049d":"ours","payload":{"correlationId":"theirs"}}',
        # No key with a plain string value: a malformed line is parsed, and logged as one.
        b'{"correlationId":7,"payload":{}}', b'not json', b'{"id":"1"}',
        b'{"correlationId":"\xff\xfe","payload":{}}',
    ])
    def test_anything_that_may_be_ours_or_malformed_is_parsed(self, registry, line):
        assert not registry.unwanted(line)

    def test_a_late_reply_is_still_parsed_so_it_is_logged(self, registry):
        waiter = registry.register("a.response", "gave-up")
        registry.discard(waiter)  # expired: its reply is logged once when it comes
        assert not registry.unwanted(self.line(correlationId="gave-up", payload={}))
        answered = registry.register("a.response", "answered")
        registry.resolve("a.response", {"correlationId": "answered"})
        registry.discard(answered)
        assert registry.unwanted(self.line(correlationId="answered", payload={}))  # a copy: dropped silently

    def test_envelopes_skip_unwanted_lines_unparsed(self, registry, caplog):
        import io

        from bus_containers_provider.bus.client import envelopes

        body = b"\n".join([b'{"correlationId":"theirs","payload":{"n":NaN}}',
                           self.line(correlationId="ours", payload={"n": 1}), b"not json"]) + b"\n"
        got = list(envelopes(io.BytesIO(body), "a.response", unwanted=registry.unwanted))
        assert [e["correlationId"] for e in got] == ["ours"]
        # The NaN line was another's and never parsed; the junk line still is, and is logged.
        assert caplog.text.count("not a JSON envelope") == 1


def test_sessions_read_no_proxy_or_netrc_from_the_environment(client, monkeypatch, tmp_path):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "ca.pem"))
    from bus_containers_provider.bus.client import new_session

    session = new_session()
    assert session.trust_env is False
    assert session.verify == str(tmp_path / "ca.pem")  # a private CA bundle is still honoured
    assert client._session().trust_env is False
    with client._borrowed() as borrowed:
        assert borrowed.trust_env is False


class TestUntilWanted:
    """A stream nobody here waits on is read in batches; a waiter has it read at once again."""

    @staticmethod
    def waiting(registry, name="a.response"):
        thread = threading.Thread(target=registry.until_wanted, args=(name, 30), daemon=True)
        thread.start()
        return thread

    def test_returns_at_once_while_a_waiter_is_pending(self):
        registry = ReplyRegistry()
        registry.register("a.response", "c1")
        thread = self.waiting(registry)
        thread.join(10)
        assert not thread.is_alive()

    def test_a_waiter_registering_ends_the_wait_and_only_on_its_own_stream(self):
        registry = ReplyRegistry()
        thread = self.waiting(registry)
        registry.register("other.response", "c0")
        thread.join(0.2)
        assert thread.is_alive(), "a waiter on another stream is not this stream's"
        registry.register("a.response", "c1")
        thread.join(10)
        assert not thread.is_alive()

    @pytest.mark.parametrize("end", ["discard", "resolve", "mark_down"])
    def test_once_the_last_waiter_is_gone_the_stream_waits_again(self, end):
        registry = ReplyRegistry()
        first, second = registry.register("a.response", "c1"), registry.register("a.response", "c2")
        for waiter in (first, second):
            if end == "discard":
                registry.discard(waiter)
            elif end == "resolve":
                registry.resolve("a.response", {"correlationId": waiter.correlation_id, "payload": {}})
        if end == "mark_down":
            registry.mark_down("a.response", "test")
            registry.mark_up("a.response")
        thread = self.waiting(registry)
        thread.join(0.2)
        assert thread.is_alive()
        registry.register("a.response", "c3")
        thread.join(10)
        assert not thread.is_alive()

    def test_wake_ends_the_wait_at_once(self):
        registry = ReplyRegistry()
        thread = self.waiting(registry)
        thread.join(0.2)
        assert thread.is_alive()
        registry.wake("a.response")
        thread.join(10)
        assert not thread.is_alive()

    def test_the_wait_ends_after_its_timeout(self):
        registry = ReplyRegistry()
        thread = threading.Thread(target=registry.until_wanted, args=("a.response", 0.01))
        thread.start()
        thread.join(10)
        assert not thread.is_alive()


class TestCancelWatch:
    def test_one_thread_cancels_only_the_waits_whose_caller_left(self):
        from bus_containers_provider.bus.replies import CancelWatch, Waiter
        from bus_containers_provider.errors import RunCancelled

        before = set(threading.enumerate())  # other tests' watch threads may still be ending
        watch = CancelWatch(every=0.01)
        gone = threading.Event()
        left, stays = Waiter("a.response", "c1", watch), Waiter("a.response", "c2", watch)
        outcome = {}

        def wait(name, waiter, cancelled):
            try:
                outcome[name] = waiter.wait(10, cancelled)
            except RunCancelled as exc:
                outcome[name] = str(exc)

        def caller_left():
            return "the caller went away" if gone.is_set() else None

        threads = [threading.Thread(target=wait, args=("left", left, caller_left)),
                   threading.Thread(target=wait, args=("stays", stays, lambda: None))]
        for thread in threads:
            thread.start()
        gone.set()
        threads[0].join(10)
        assert outcome == {"left": "the caller went away"}
        stays._complete(envelope={"payload": {"n": 1}})
        threads[1].join(10)
        assert outcome["stays"] == {"payload": {"n": 1}}
        assert [t.name for t in threading.enumerate() if t not in before].count("cancel-watch") <= 1

    def test_the_watch_thread_ends_once_nothing_is_watched(self):
        from bus_containers_provider.bus.replies import CancelWatch, Waiter

        watch = CancelWatch(every=0.01)
        waiter = Waiter("a.response", "c1", watch)
        with pytest.raises(ReplyTimeout):
            waiter.wait(0.05, lambda: None)
        thread = watch._thread
        if thread is not None:
            thread.join(5)
        assert watch._thread is None and not watch._watched

    def test_one_named_daemon_thread_watches_every_waiter_of_a_registry(self):
        registry = ReplyRegistry()
        before = set(threading.enumerate())
        waiters = [registry.register("a.response", cid) for cid in ("c1", "c2")]
        threads = [threading.Thread(target=w.wait, args=(10, lambda: None)) for w in waiters]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 5
        while len(registry._watch._watched) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        watching = [t for t in threading.enumerate() if t not in before and t not in threads]
        assert [(t.name, t.daemon) for t in watching] == [("cancel-watch", True)]
        for cid in ("c1", "c2"):
            registry.resolve("a.response", {"correlationId": cid})
        for thread in threads:
            thread.join(5)

    def test_a_watch_whose_thread_ended_starts_another_for_the_next_wait(self):
        from bus_containers_provider.bus.replies import CancelWatch, Waiter
        from bus_containers_provider.errors import RunCancelled

        watch = CancelWatch(every=0.01)
        with pytest.raises(ReplyTimeout):
            Waiter("a.response", "c1", watch).wait(0.05, lambda: None)
        deadline = time.monotonic() + 5
        while watch._thread is not None:  # the thread ends once nothing is watched
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(RunCancelled, match="stop"):
            Waiter("a.response", "c2", watch).wait(5, lambda: "stop")

    def test_a_failing_check_does_not_stop_the_others(self, caplog):
        from bus_containers_provider.bus.replies import CancelWatch, Waiter
        from bus_containers_provider.errors import RunCancelled

        watch = CancelWatch(every=0.01)
        broken, fine = Waiter("a.response", "c1", watch), Waiter("a.response", "c2", watch)
        watch.add(broken, lambda: 1 / 0)
        with pytest.raises(RunCancelled):
            fine.wait(10, lambda: "shutting down")
        watch.remove(broken)
        assert {r.getMessage() for r in caplog.records} == {"checking whether a run was cancelled failed"}


def test_a_proxy_in_the_environment_is_not_used_for_the_events_api(events_server, monkeypatch):
    from conftest import EVENTS_TOKEN

    # Nothing listens on port 9: a publish sent through this proxy would fail.
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    events = EventsClient(events_server.url, EVENTS_TOKEN, connect_timeout=2, publish_timeout=5)
    try:
        events.publish("a.request", "cid-proxy", {"x": 1})
    finally:
        events.close()


# --- what goes on the wire, exactly: the contract's names, timeouts and messages -------------

@responses.activate
@pytest.mark.parametrize("base", [BASE, BASE + "/", BASE + "//"])
def test_only_trailing_slashes_of_the_base_url_are_trimmed(base):
    events = EventsClient(base, TOKEN)
    responses.post(PUBLISH, status=202)
    events.publish("a.request", "cid", {})
    assert responses.calls[0].request.url == PUBLISH
    events.close()


@responses.activate
def test_a_base_url_path_is_kept():
    events = EventsClient(f"{BASE}/X/", TOKEN)
    responses.post(f"{BASE}/X/api/v1/events", status=202)
    events.publish("a.request", "cid", {})
    assert responses.calls[0].request.url == f"{BASE}/X/api/v1/events"
    events.close()


@responses.activate
def test_default_timeouts_are_5_s_to_connect_and_30_s_to_publish():
    events = EventsClient(BASE, TOKEN)
    responses.post(PUBLISH, status=202)
    responses.get(STREAM, body=b"")
    events.publish("a.request", "cid", {})
    events.open_stream("a.response", 42).close()
    assert [call.request.req_kwargs["timeout"] for call in responses.calls] == [(5.0, 30.0), (5.0, 42)]
    events.close()


@responses.activate
@pytest.mark.parametrize("options,query", [
    ({}, {"name": ["a.response"], "delivery": ["broadcast"]}),
    ({"replay": True}, {"name": ["a.response"], "delivery": ["broadcast"], "replay": ["true"]}),
    ({"follow": False}, {"name": ["a.response"], "delivery": ["broadcast"], "follow": ["false"]}),
    ({"replay": True, "follow": False},
     {"name": ["a.response"], "delivery": ["broadcast"], "replay": ["true"], "follow": ["false"]}),
])
def test_a_stream_is_asked_for_by_its_exact_query(client, options, query):
    from urllib.parse import parse_qs, urlsplit

    responses.get(STREAM, body=b"")
    client.open_stream("a.response", 3, **options).close()
    [call] = responses.calls
    assert parse_qs(urlsplit(call.request.url).query) == query
    assert call.request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert call.request.req_kwargs["timeout"] == (1, 3) and call.request.req_kwargs["stream"] is True


@responses.activate
def test_stream_passes_its_idle_timeout_session_and_raw_body():
    events = EventsClient(BASE, TOKEN, connect_timeout=2)
    used, opened = [], []

    class Recording(requests.Session):
        def get(self, *args, **kwargs):
            used.append(self)
            return super().get(*args, **kwargs)

    session = Recording()
    responses.get(STREAM, body=json.dumps({"id": "1", "correlationId": "c"}).encode() + b"\n")
    assert [e["id"] for e in events.stream("a.response", idle_timeout=7, on_open=opened.append,
                                           session=session)] == ["1"]
    assert used == [session] and responses.calls[0].request.req_kwargs["timeout"] == (2, 7)
    [raw] = opened
    assert hasattr(raw, "read1") and hasattr(raw, "shutdown")
    session.close()
    events.close()


@responses.activate
@pytest.mark.parametrize("status", [300, 307, 399])
def test_a_redirect_is_not_followed_and_says_why(client, status):
    for method in (responses.POST, responses.GET):
        responses.add(method, PUBLISH if method == responses.POST else STREAM, status=status,
                      headers={"Location": "http://elsewhere.test/"})
    with pytest.raises(EventsUnavailable) as publish:
        client.publish("a.request", "cid", {})
    with pytest.raises(EventsUnavailable) as stream:
        client.open_stream("a.response", 1)
    advice = "a redirect, which is not followed (set BUS_EVENTS_API_URL to the Events API itself)"
    assert str(publish.value) == f"publishing a.request: the Events API answered {status}, {advice}"
    assert str(stream.value) == f"opening the a.response stream: the Events API answered {status}, {advice}"
    assert len(responses.calls) == 2  # nothing was sent to elsewhere.test


@responses.activate
@pytest.mark.parametrize("status,kind", [(400, EventsRejected), (429, EventsRejected), (499, EventsRejected),
                                         (500, EventsUnavailable), (503, EventsUnavailable)])
def test_refusal_messages_name_the_action_and_the_status(client, status, kind):
    responses.post(PUBLISH, status=status)
    responses.get(STREAM, status=status)
    with pytest.raises(kind) as publish:
        client.publish("a.request", "cid", {})
    with pytest.raises(kind) as stream:
        client.open_stream("a.response", 1)
    assert str(publish.value) == f"publishing a.request: the Events API answered {status}"
    assert str(stream.value) == f"opening the a.response stream: the Events API answered {status}"
    if kind is EventsRejected:
        assert publish.value.status == status and stream.value.status == status


@responses.activate
@pytest.mark.parametrize("failure,message", [
    (requests.ConnectionError("refused"), "publishing a.request failed: ConnectionError"),
    (requests.ReadTimeout("slow"), "publishing a.request timed out"),
])
def test_publish_failure_messages(client, failure, message):
    responses.post(PUBLISH, body=failure)
    with pytest.raises(EventsUnavailable) as raised:
        client.publish("a.request", "cid", {})
    assert str(raised.value) == message


@responses.activate
def test_stream_failure_message(client):
    responses.get(STREAM, body=requests.ConnectionError("refused"))
    with pytest.raises(EventsUnavailable) as raised:
        client.open_stream("a.response", 1)
    assert str(raised.value) == "opening the a.response stream failed: ConnectionError"


def test_a_broken_stream_says_which_and_how(client):
    import urllib3

    class Broken:
        def read1(self, size):
            raise urllib3.exceptions.ProtocolError("cut")

    from bus_containers_provider.bus.client import envelopes

    with pytest.raises(EventsUnavailable) as raised:
        list(envelopes(Broken(), "a.response"))
    assert str(raised.value) == "the a.response stream dropped: ProtocolError"


def test_a_thread_keeps_its_stream_session(client):
    assert client._session() is client._session()


@pytest.mark.parametrize("environment,verify", [
    ({}, True),
    ({"CURL_CA_BUNDLE": "/curl.pem"}, "/curl.pem"),
    ({"REQUESTS_CA_BUNDLE": "/requests.pem", "CURL_CA_BUNDLE": "/curl.pem"}, "/requests.pem"),
])
def test_a_private_ca_bundle_is_read_from_either_variable(monkeypatch, environment, verify):
    from bus_containers_provider.bus.client import new_session

    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert new_session().verify == verify


class _Pieces:
    """A raw stream whose read1 hands out the given pieces, one per call."""

    def __init__(self, pieces):
        self._pieces = list(pieces)

    def read1(self, _size):
        return self._pieces.pop(0) if self._pieces else b""


def _line_of(size: int, envelope_id: str) -> bytes:
    head = b'{"id":"' + envelope_id.encode() + b'","name":"a.response","payload":{"pad":"'
    tail = b'"}}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


@pytest.mark.parametrize("split", [1, 3, 7])
def test_a_line_at_the_cap_split_over_reads_is_kept_and_one_byte_over_is_dropped(split, caplog):
    """§5: lines up to 16 MiB are read whole however the stream cuts them; a longer one is dropped alone."""
    from bus_containers_provider.bus.client import MAX_LINE_BYTES, envelopes

    at_cap, over = _line_of(MAX_LINE_BYTES, "at-cap"), _line_of(MAX_LINE_BYTES + 1, "over")
    data = at_cap + b"\n" + over + b"\n" + b'{"id":"after","name":"a.response","payload":{}}\n'
    step = -(-len(data) // (split * 2))
    pieces = [data[i:i + step] for i in range(0, len(data), step)]
    got = [e["id"] for e in envelopes(_Pieces(pieces), "a.response")]
    assert got == ["at-cap", "after"]
    assert "discarding a line over" in caplog.text


def test_a_line_at_the_cap_ending_a_read_that_began_with_another_line_is_kept():
    """The cap counts only the line's own bytes: not those of the line before it in the same read,
    and a line of exactly 16 MiB whose newline comes in the next read is whole, not over."""
    from bus_containers_provider.bus.client import MAX_LINE_BYTES, envelopes

    first = b'{"id":"first","name":"a.response","payload":{}}'
    pieces = [first + b"\n" + _line_of(MAX_LINE_BYTES, "at-cap"),
              b'\n{"id":"after","name":"a.response","payload":{}}\n']
    assert [e["id"] for e in envelopes(_Pieces(pieces), "a.response")] == ["first", "at-cap", "after"]
