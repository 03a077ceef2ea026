"""The reply listener (bus/listener.py) on its own, against the real Events API on 127.0.0.1.

CONTRACT §1 (BUS_EVENTS_LISTENER_*) and §5 "Streams that drop", one path at a time and with short
waits, so that each path is pinned by a test that takes well under a second: what the listener
tells the registry, the log and the §8 series when its stream opens, drops, is refused, goes
silent or is stopped, and what a catch-up finds in the stored history.
"""
import logging
import re
import threading
import time

import pytest
import requests

from conftest import EVENTS_TOKEN, WORKER_TOKEN
from inflight import wait_until

from bus_containers_provider import metrics
from bus_containers_provider.bus import listener as listener_module
from bus_containers_provider.bus.client import EventsClient, ListenerDown
from bus_containers_provider.bus.listener import Listener
from bus_containers_provider.bus.replies import ReplyRegistry
from bus_containers_provider.credentials import TokenFile

# Every test here waits on a stream or a server: a listener that never answers fails it at this bound.
pytestmark = pytest.mark.timeout(20)

NAME = "a.response"
LOGGER = "bus_containers_provider.bus.listener"
OPEN_503 = f"opening the {NAME} stream: the Events API answered 503"


@pytest.fixture
def client(events_server):
    events = EventsClient(events_server.url, EVENTS_TOKEN, connect_timeout=2)
    yield events
    events.close()


@pytest.fixture
def registry():
    return ReplyRegistry()


@pytest.fixture
def listen(client, registry):
    """Start a Listener for NAME with short waits (keyword arguments override them, `client` and `registry`
    too); stopped after the test."""
    started = []

    def start(**options):
        settings = dict(retry=True, retry_min=0.05, retry_max=0.2, down_grace=0.3, idle_timeout=30)
        on = options.pop("registry", registry)
        listener = Listener(options.pop("client", client), NAME, on, **{**settings, **options})
        started.append(listener)
        listener.start()
        return listener

    yield start
    for listener in started:
        listener.stop()


def publish(server, correlation_id, name=NAME, **payload):
    """Publish a reply the way an integration worker does."""
    response = requests.post(f"{server.url}/api/v1/events", timeout=5, headers={
        "Authorization": f"Bearer {WORKER_TOKEN}"}, json={
        "name": name, "correlationId": correlation_id, "payload": payload})
    assert response.status_code == 202


def warnings_and_errors(caplog):
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


def take_down(server, listener):
    """Drop the stream and refuse its reopening until reset_faults()."""
    server.fail_streams(503)
    assert server.drop_streams(NAME) == 1
    wait_until(lambda: not listener.connected, timeout=5, what="the listener noticing the drop")


def test_a_reply_reaches_its_waiter_over_one_stream_read_by_named_daemon_threads(listen, registry, events_server):
    listener = listen()
    assert listener.wait_connected(5)
    waiter = registry.register(NAME, "c1")
    publish(events_server, "c1", n=1)
    assert waiter.wait(5)["payload"] == {"n": 1}
    registry.discard(waiter)
    # One stream, and no history read: nothing was waiting when it opened.
    assert events_server.streams_opened(NAME) == 1 and events_server.open_streams(NAME) == 1
    readers = [t for t in threading.enumerate() if t.name == f"stream:{NAME}"]
    assert listener.name == f"listener:{NAME}" and listener.daemon
    assert len(readers) == 1 and readers[0].daemon


def test_another_process_reply_is_dropped_unparsed(listen, registry, events_server, caplog):
    """Its line is never parsed: not even one that is not JSON (NaN) is noticed, let alone logged."""
    listener = listen()
    assert listener.wait_connected(5)
    waiter = registry.register(NAME, "ours")
    response = requests.post(f"{events_server.url}/api/v1/events", timeout=5, headers={
        "Authorization": f"Bearer {WORKER_TOKEN}", "Content-Type": "application/json"},
        data=f'{{"name": "{NAME}", "correlationId": "theirs", "payload": {{"n": NaN}}}}')
    assert response.status_code == 202
    publish(events_server, "ours", n=1)
    assert waiter.wait(5)["payload"] == {"n": 1}
    registry.discard(waiter)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_stop_closes_the_stream_and_leaves_no_thread_and_no_warning(listen, client, events_server, caplog):
    before, sessions = set(threading.enumerate()), len(client._sessions)
    # A long down grace and idle timeout: nothing but stop() ends the threads in time.
    listener = listen(down_grace=30, idle_timeout=30)
    assert listener.wait_connected(5)
    listener.stop()
    assert not listener.is_alive()
    assert len(client._sessions) == sessions  # the stream had the listener's own session, closed with it
    assert events_server.wait_for_streams(0, NAME, timeout=5)
    # The listener's own threads (listener:, stream:, catch-up: NAME), not every new one in the process: a
    # daemon thread an earlier test left (a completer, a cancel watch) may start or end meanwhile.
    wait_until(lambda: not [t for t in threading.enumerate() if t not in before and t.is_alive() and NAME in t.name],
               timeout=5, what="every thread of the listener ending")
    assert warnings_and_errors(caplog) == []


def test_the_down_grace_runs_on_a_daemon_timer(listen, events_server):
    """A pending grace never holds the process at exit."""
    events_server.fail_streams(503)
    before = set(threading.enumerate())
    listen(down_grace=30)
    timers = [t for t in threading.enumerate() if isinstance(t, threading.Timer) and t not in before]
    assert timers and all(t.daemon for t in timers)


def test_a_dropped_stream_is_logged_as_a_warning_and_reopened_at_once(listen, registry, events_server, caplog):
    listener = listen()
    assert listener.wait_connected(5)
    assert events_server.drop_streams(NAME) == 1
    wait_until(lambda: events_server.streams_opened(NAME) == 2 and listener.connected, timeout=5,
               what="the stream reopened")
    [(level, message)] = warnings_and_errors(caplog)
    assert level == logging.WARNING and message.startswith(f"the {NAME} stream dropped: ")
    waiter = registry.register(NAME, "c1")
    publish(events_server, "c1", n=2)
    assert waiter.wait(5)["payload"] == {"n": 2}
    registry.discard(waiter)


def test_down_past_its_grace_new_waiters_are_refused_and_those_waiting_keep_waiting(listen, registry,
                                                                                     events_server, caplog):
    listener = listen()
    assert listener.wait_connected(5)
    waiting = registry.register(NAME, "c1")
    take_down(events_server, listener)
    wait_until(lambda: registry.is_down(NAME), timeout=5, what="the down grace ending")
    with pytest.raises(ListenerDown) as refused:
        registry.register(NAME, "c2")
    assert re.fullmatch(rf"the {NAME} listener is not connected \(the {NAME} stream dropped: \w+\)",
                        str(refused.value)), str(refused.value)
    assert registry.pending(NAME) == 1  # with retry its reply can still come
    assert (logging.WARNING, OPEN_503) in warnings_and_errors(caplog)
    events_server.reset_faults()
    assert listener.wait_connected(5)
    wait_until(lambda: not registry.is_down(NAME), timeout=5, what="the stream marked up")
    publish(events_server, "c1", n=3)
    assert waiting.wait(5)["payload"] == {"n": 3}
    registry.discard(waiting)


def test_never_connected_past_its_grace_the_stream_is_down_as_not_connected_yet(listen, registry, events_server):
    events_server.fail_streams(503)
    listener = listen()
    wait_until(lambda: registry.is_down(NAME), timeout=5, what="the down grace ending")
    with pytest.raises(ListenerDown, match=re.escape(f"the {NAME} listener is not connected (not connected yet)")):
        registry.register(NAME, "c1")
    assert listener.is_alive()  # with retry it keeps trying
    events_server.reset_faults()
    assert listener.wait_connected(5)


class TestWithoutRetry:
    def test_a_dropped_stream_stays_down_and_fails_its_waiters_only_after_the_grace(self, listen, registry,
                                                                                   events_server, caplog):
        listener = listen(retry=False, down_grace=1.5)
        assert listener.wait_connected(5)
        waiting = registry.register(NAME, "c1")
        events_server.fail_streams(503)
        assert events_server.drop_streams(NAME) == 1
        listener.join(5)  # its one reopen refused, the listener ends
        assert not listener.is_alive()
        assert registry.pending(NAME) == 1  # not failed yet: the grace is still running
        with pytest.raises(ListenerDown) as failed:
            waiting.wait(10)
        assert re.fullmatch(rf"the {NAME} listener is not connected \(the {NAME} stream dropped: \w+\)",
                            str(failed.value)), str(failed.value)
        registry.discard(waiting)
        assert warnings_and_errors(caplog)[-2:] == [
            (logging.WARNING, OPEN_503),
            (logging.ERROR, f"the {NAME} listener stays down (BUS_EVENTS_LISTENER_RETRY is not set)")]

    @pytest.mark.parametrize("status,level,message", ids=["503", "404", "401", "403"], argvalues=[
        (503, logging.WARNING, OPEN_503),
        (404, logging.ERROR, f"opening the {NAME} stream: the Events API answered 404"),
        (401, logging.ERROR, f"the Events API refused the provider's token for {NAME} (HTTP 401)"),
        (403, logging.ERROR, f"the Events API refused the provider's token for {NAME} (HTTP 403)"),
    ])
    def test_a_stream_that_never_opens_is_down_at_once_and_its_refusal_logged(
            self, listen, registry, events_server, caplog, status, level, message):
        events_server.fail_streams(status)
        listener = listen(retry=False, down_grace=30)
        listener.join(5)
        assert not listener.is_alive()
        assert registry.is_down(NAME)  # now, not after the 30 s grace: nothing waits on it yet
        with pytest.raises(ListenerDown) as refused:
            registry.register(NAME, "c1")
        reason = f"opening the {NAME} stream: the Events API answered {status}"
        assert str(refused.value) == f"the {NAME} listener is not connected ({reason})"
        assert warnings_and_errors(caplog) == [
            (level, message), (logging.ERROR, f"the {NAME} listener stays down (BUS_EVENTS_LISTENER_RETRY is not set)")]
        assert EVENTS_TOKEN not in caplog.text


def test_a_reader_that_fails_on_a_bug_is_logged_and_counts_as_a_drop(listen, events_server, caplog):
    class Broken(ReplyRegistry):
        def resolve(self, reply_name, envelope):
            raise RuntimeError("a bug")

    registry = Broken()
    listener = listen(registry=registry)
    assert listener.wait_connected(5)
    waiter = registry.register(NAME, "c1")
    events_server.fail_streams(503)
    publish(events_server, "c1")
    wait_until(lambda: registry.is_down(NAME), timeout=5, what="the down grace ending")
    with pytest.raises(ListenerDown, match=re.escape("(unexpected error)")):
        registry.register(NAME, "c2")
    [failed] = [r for r in caplog.records if r.name == LOGGER and r.exc_info]
    assert failed.levelno == logging.ERROR and "RuntimeError: a bug" in caplog.text
    registry.discard(waiter)


class Series:
    """Stands in for metrics.series: records what the listener reports (§8)."""

    class Recorder:
        def __init__(self):
            self.calls = []

        def labels(self, event):
            recorder = self

            class Child:
                def set(self, value):
                    recorder.calls.append((event, value))

                def inc(self):
                    recorder.calls.append((event, 1))

            return Child()

    def __init__(self):
        self.LISTENER_CONNECTED = self.Recorder()
        self.LISTENER_RECONNECTS = self.Recorder()


def test_the_connected_gauge_and_the_reconnect_counter(listen, events_server, monkeypatch):
    series = Series()
    monkeypatch.setattr(metrics, "_series", series)
    events_server.fail_streams(503)
    listener = listen()
    wait_until(lambda: len(series.LISTENER_RECONNECTS.calls) >= 2, timeout=5, what="two refused opens")
    events_server.reset_faults()
    assert listener.wait_connected(5)
    refused = len(series.LISTENER_RECONNECTS.calls)
    assert series.LISTENER_CONNECTED.calls == [(NAME, 0), (NAME, 0), (NAME, 1)]
    assert events_server.drop_streams(NAME) == 1
    wait_until(lambda: len(series.LISTENER_CONNECTED.calls) == 5, timeout=5, what="the drop and the reopen")
    assert series.LISTENER_CONNECTED.calls[3:] == [(NAME, 0), (NAME, 1)]
    assert series.LISTENER_RECONNECTS.calls == [(NAME, 1)] * (refused + 1)


class Clock:
    """time.monotonic for the listener module, moved on by the test: how long a stream lived, without waiting."""

    def __init__(self):
        self.offset = 0.0

    def monotonic(self):
        return time.monotonic() + self.offset

    def sleep(self, seconds):
        time.sleep(seconds)


class RecordedPauses(threading.Event):
    """The listener's stop event, with its pauses recorded instead of slept."""

    def __init__(self):
        super().__init__()
        self.pauses = []

    def wait(self, timeout=None):
        self.pauses.append(timeout)
        return self.is_set()


def test_a_stream_that_ends_as_it_opens_is_reopened_with_back_off_and_one_that_lived_at_once(
        client, registry, events_server, monkeypatch):
    """§1 RETRY_MIN/RETRY_MAX for streams that open and end at once (a proxy cutting them, say)."""
    clock = Clock()
    monkeypatch.setattr(listener_module, "time", clock)
    opened, lived = [], threading.Event()

    class Cutting:
        """The real client, but every stream except the fifth is cut as soon as it is open."""

        def open_stream(self, *args, **kwargs):
            response = client.open_stream(*args, **kwargs)
            opened.append(response)
            if len(opened) == 5:
                lived.set()
            else:
                response.raw.shutdown()
            if len(opened) == 8:
                listener._stopping.set()
            return response

    listener = Listener(Cutting(), NAME, registry, retry=True, retry_min=2, retry_max=8, down_grace=30,
                        idle_timeout=1000)
    listener._stopping = RecordedPauses()
    listener.start()
    try:
        assert lived.wait(10)
        wait_until(lambda: listener.connected, timeout=5, what="the fifth stream read")
        clock.offset += 10  # it lived 10 s
        assert events_server.drop_streams(NAME) >= 1  # the cut ones are still open on the server's side
        listener.join(10)
        assert not listener.is_alive()
    finally:
        listener.stop()
    assert listener._stopping.pauses == [2, 4, 8, 8, 2, 4]


def test_a_silent_stream_is_replaced_make_before_break(client, registry, events_server, caplog):
    listener = Listener(client, NAME, registry, retry=True, retry_min=0.05, retry_max=0.2, down_grace=30,
                        idle_timeout=0.6)
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    listener._stopping = RecordedPauses()  # the overlap before the old stream is closed: recorded, not waited
    listener.start()
    try:
        assert listener.wait_connected(5)
        for cid in ("c1", "c2"):  # one reply read before the stream goes silent, one after its replacement
            waiter = registry.register(NAME, cid)
            publish(events_server, cid, n=cid)
            assert waiter.wait(5)["payload"] == {"n": cid}
            registry.discard(waiter)
            wait_until(lambda: events_server.streams_opened(NAME) >= 2 and events_server.open_streams(NAME) == 1,
                       timeout=5, what="the silent stream replaced and the old one closed")
        assert listener._stopping.pauses[0] == listener_module.OVERLAP_SECONDS
        # Listening is reported once, when the first stream opens; each replacement only at debug level.
        lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == LOGGER]
        assert lines[0] == (logging.INFO, f"listening for {NAME}") and len(lines) >= 2
        assert set(lines[1:]) == {(logging.DEBUG, f"replaced the idle {NAME} stream")}
    finally:
        listener.stop()


def test_stopping_the_listener_ends_its_back_off_at_once(client, registry, events_server, caplog):
    events_server.fail_streams(503)
    listener = Listener(client, NAME, registry, retry=True, retry_min=30, retry_max=30, down_grace=30,
                        idle_timeout=30)
    listener.start()
    wait_until(lambda: warnings_and_errors(caplog), what="the first refusal")
    listener.stop(timeout=5)
    assert not listener.is_alive()


CAUGHT_UP = re.compile(rf"caught up on {re.escape(NAME)}: (\d+) of (\d+) waiting replies found in (\d+) stored "
                       r"events \((\d+\.\d\d)s\)")


def caught_up(caplog):
    return [CAUGHT_UP.fullmatch(r.getMessage()) for r in caplog.records if r.name == LOGGER
            and r.getMessage().startswith("caught up")]


def test_a_catch_up_finds_every_missed_reply_and_stops_after_the_last(listen, client, registry, events_server,
                                                                       caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    listener = listen()
    assert listener.wait_connected(5)
    waiters = [registry.register(NAME, cid) for cid in ("c1", "c2")]
    sessions = len(client._sessions)
    take_down(events_server, listener)
    started = time.monotonic()
    # Published while no stream of ours is open; the history has another process's reply on each side.
    for cid in ("theirs", "c1", "c2", "theirs-too"):
        publish(events_server, cid, n=cid)
    events_server.reset_faults()
    assert [w.wait(5)["payload"] for w in waiters] == [{"n": "c1"}, {"n": "c2"}]
    wait_until(lambda: caught_up(caplog), timeout=5, what="the catch-up's summary")
    elapsed = time.monotonic() - started
    [line] = caught_up(caplog)
    assert line is not None and line.groups()[:3] == ("2", "2", "3")  # it stopped after c2
    assert 0 <= float(line.group(4)) <= elapsed
    wait_until(lambda: events_server.open_streams(NAME) == 1, timeout=5, what="the history read closed")
    assert len(client._sessions) == sessions  # the history read's own session, closed with it
    for waiter in waiters:
        registry.discard(waiter)


def test_a_catch_up_reads_the_whole_history_for_a_reply_that_is_not_there(listen, registry, events_server, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    listener = listen()
    assert listener.wait_connected(5)
    found, missing = registry.register(NAME, "c1"), registry.register(NAME, "c2")
    take_down(events_server, listener)
    for cid in ("c1", "theirs"):
        publish(events_server, cid, n=cid)
    events_server.reset_faults()
    assert found.wait(5)["payload"] == {"n": "c1"}
    wait_until(lambda: caught_up(caplog), timeout=5, what="the catch-up's summary")
    [line] = caught_up(caplog)
    assert line is not None and line.groups()[:3] == ("1", "2", "2")
    # It read the stored history and ended: it does not follow the live stream while c2 still waits.
    wait_until(lambda: events_server.open_streams(NAME) == 1, timeout=5, what="the history read closed")
    assert registry.pending(NAME) == 1
    publish(events_server, "c2", n="live")
    assert missing.wait(5)["payload"] == {"n": "live"}
    for waiter in (found, missing):
        registry.discard(waiter)


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_stream_is_logged_as_an_error_and_tried_again_only_at_the_longest_backoff(
        listen, events_server, caplog, status):
    """§5: our own credential, not an outage."""
    events_server.fail_streams(status)
    listener = listen(retry_min=0.01, retry_max=1.0, down_grace=30)
    wait_until(lambda: len(events_server.stream_answers(NAME)) >= 3, timeout=10, what="three refused opens")
    listener.stop()
    times = [at for at, _ in events_server.stream_answers(NAME)]
    # An outage would be tried again after 0.01 s, 0.02 s, 0.04 s …: seven opens in the first 1.3 s.
    gaps = [later - earlier for earlier, later in zip(times, times[1:])]
    assert all(gap >= 0.95 for gap in gaps), gaps
    assert warnings_and_errors(caplog)[0] == (
        logging.ERROR, f"the Events API refused the provider's token for {NAME} (HTTP {status}); "
                       "trying again in 1s, or once the token changes")
    assert EVENTS_TOKEN not in caplog.text


def test_a_new_token_in_the_file_ends_the_longest_backoff_at_once(listen, events_server, tmp_path):
    token_file = tmp_path / "events.jwt"
    token_file.write_text(EVENTS_TOKEN)
    events_server.accept_tokens({"rotated-token": None})
    client = EventsClient(events_server.url, TokenFile(str(token_file)), connect_timeout=2)
    listener = listen(client=client, retry_max=60, down_grace=30)
    try:
        wait_until(lambda: events_server.stream_answers(NAME), timeout=5, what="the first refused open")
        token_file.write_text("rotated-token")
        # Within the file's check interval, not the 60 s backoff.
        assert listener.wait_connected(10)
        assert [status for _, status in events_server.stream_answers(NAME)] == [401, 200]
    finally:
        listener.stop()
        client.close()
