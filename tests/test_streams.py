"""CONTRACT §5 "Streams that drop", in process against the real Events API: waiters outlive a
reconnect, a reopen has no gap, an oversized line breaks nothing, late and duplicate replies."""
import concurrent.futures
import json
import logging
import random
import subprocess
import sys
import time

import pytest
import requests

from conftest import EVENTS_TOKEN, WORKER_TOKEN, bearer, connected, events_env
from inflight import RUN_REPLY, RUN_REQUEST, RUNS, caught_up, reply_as_worker, start_run, wait_until



@pytest.fixture
def app_env(events_server):
    # A short run grace: the runs here that go unanswered wait timeout_seconds + 0.5 s, not + 2 s.
    return events_env(events_server, BUS_EVENTS_LISTENER_REQUIRED="1", BUS_CONTAINERS_RUN_TIMEOUT_GRACE="500ms")


@pytest.fixture
def client(app, responder):
    return connected(app).test_client()


def bus(app):
    return app.extensions["bus_containers"].bus


def take_stream_down(app, server, name=RUN_REPLY):
    server.fail_streams(503)
    assert server.drop_streams(name) == 1
    wait_until(lambda: name in bus(app).disconnected(), what="the listener noticing the drop")


def test_waiters_outlive_a_dropped_stream_while_retry_is_on(app, client, events_server):
    thread, box = start_run(client)
    [request] = events_server.wait_published(RUN_REQUEST, count=1)
    take_stream_down(app, events_server)

    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.headers["Retry-After"]
    assert RUN_REPLY in ready.get_json()["error"]["message"]
    refused = client.post(RUNS, headers=bearer("acct-b"), json={"profile": "never", "args": ["x"]})
    assert refused.status_code == 503 and refused.headers["Retry-After"]
    assert len(events_server.published(RUN_REQUEST)) == 1  # refused before anything was published
    time.sleep(app.extensions["bus_containers"].settings.listener_down_grace)  # well past the down grace
    assert thread.is_alive() and bus(app).registry.pending(RUN_REPLY) == 1

    events_server.reset_faults()
    connected(app)
    reply_as_worker(events_server, request, stdout="after the reconnect")
    thread.join(10)
    assert box["response"].status_code == 200
    assert box["response"].get_json()["stdout"] == "after the reconnect"
    assert client.get("/readyz").status_code == 200
    assert bus(app).registry.pending() == 0


def test_a_reply_published_while_the_stream_was_down_is_caught_up(app, client, events_server, caplog):
    caplog.set_level(logging.INFO, logger="bus_containers_provider.bus")
    mine, box = start_run(client, "acct-a")
    other, other_box = start_run(client, "acct-b")
    requests_ = events_server.wait_published(RUN_REQUEST, count=2)
    take_stream_down(app, events_server)
    ours = {r["payload"]["owner_account_id"]: r for r in requests_}
    # Published while no stream of ours is open: a live stream never carries it.
    reply_as_worker(events_server, ours["acct-a"], stdout="while we were away")
    reply_as_worker(events_server, dict(ours["acct-a"], correlationId="another-process"), stdout="not ours")
    events_server.reset_faults()
    mine.join(10)
    assert box["response"].status_code == 200
    assert box["response"].get_json()["stdout"] == "while we were away"
    assert other.is_alive()  # its reply is not in the history: it goes on waiting
    reply_as_worker(events_server, ours["acct-b"], stdout="live")
    other.join(10)
    assert other_box["response"].get_json()["stdout"] == "live"
    wait_until(lambda: caught_up(caplog) != (0, 0), what="the catch-up's log line")
    assert caught_up(caplog) == (1, 2)
    assert bus(app).registry.pending() == 0


def test_every_reply_published_while_the_stream_was_down_is_caught_up(app, client, events_server):
    # Another process's reply comes first in the history, then both of ours: the catch-up reads past
    # what is not ours and stops only once nobody it was looking for still waits.
    runs = [start_run(client, account) for account in ("acct-a", "acct-b")]
    requests_ = events_server.wait_published(RUN_REQUEST, count=2)
    take_stream_down(app, events_server)
    reply_as_worker(events_server, dict(requests_[0], correlationId="another-process"), stdout="not ours")
    for request in requests_:
        reply_as_worker(events_server, request, stdout=f"caught up for {request['payload']['owner_account_id']}")
    events_server.reset_faults()
    for (thread, box), account in zip(runs, ("acct-a", "acct-b")):
        thread.join(15)
        assert box["response"].status_code == 200
        assert box["response"].get_json()["stdout"] == f"caught up for {account}"
    assert bus(app).registry.pending() == 0


def test_a_reply_never_published_is_answered_at_the_runs_deadline(app, client, events_server):
    started = time.monotonic()
    thread, box = start_run(client, timeout_seconds=1)
    events_server.wait_published(RUN_REQUEST, count=1)
    take_stream_down(app, events_server)
    events_server.reset_faults()
    thread.join(15)
    assert box["response"].status_code == 503 and box["response"].headers["Retry-After"]
    assert time.monotonic() - started >= 1.5  # timeout_seconds (1) + run grace (0.5): its own deadline
    assert bus(app).registry.pending() == 0


class TestWithoutRetry:
    @pytest.fixture
    def app_env(self, events_server):
        return dict(events_env(events_server), BUS_EVENTS_LISTENER_RETRY="0", BUS_EVENTS_LISTENER_DOWN_GRACE="2s")

    def test_a_dropped_stream_fails_its_waiters_after_the_down_grace(self, app, client, events_server):
        thread, box = start_run(client, timeout_seconds=30)
        events_server.wait_published(RUN_REQUEST, count=1)
        take_stream_down(app, events_server)
        # Its one reopen refused, the listener stays down; the waiter still waits out the grace.
        listener = bus(app)._listeners[RUN_REPLY]
        listener.join(5)
        assert not listener.is_alive()
        assert thread.is_alive() and bus(app).registry.pending(RUN_REPLY) == 1
        thread.join(15)  # the down grace (2 s), not the 30.5 s run wait
        assert not thread.is_alive() and box["response"].status_code == 503
        assert bus(app).registry.pending() == 0


class TestDownPastTheGrace:
    @pytest.fixture
    def app_env(self, events_server):
        return dict(events_env(events_server), BUS_EVENTS_LISTENER_DOWN_GRACE="3s")

    def test_a_request_on_a_stream_down_past_its_grace_is_refused_at_once(self, app, client, events_server):
        take_stream_down(app, events_server)
        wait_until(lambda: bus(app).registry.is_down(RUN_REPLY), what="the down grace ending")
        before = len(events_server.published())
        started = time.monotonic()
        response = client.post(RUNS, headers=bearer(), json={"profile": "codex", "args": ["x"], "timeout_seconds": 5})
        assert response.status_code == 503 and response.headers["Retry-After"]
        assert time.monotonic() - started < 3  # not a second down grace
        assert len(events_server.published()) == before  # usage and billing are off: nothing at all


class TestIdleReopen:
    @pytest.fixture
    def app_env(self, events_server):
        # 8 runs at once over 5 accounts may put 5 on one: no account limit, this is about streams.
        return dict(events_env(events_server), BUS_EVENTS_LISTENER_IDLE_TIMEOUT="100ms",
                    BUS_CONTAINERS_REQUEST_TIMEOUT="20s", BUS_CONTAINERS_MAX_RUNS_PER_ACCOUNT="0")

    def test_reopens_while_replies_flow_lose_none_of_500(self, app, client, events_server, monkeypatch):
        from bus_containers_provider.bus.listener import Listener

        # The reopen alone must lose nothing: a catch-up would hide a gap.
        monkeypatch.setattr(Listener, "_catch_up", lambda self, missed: None)
        rng = random.Random(3)
        jobs = [(f"acct-{n % 5}", f"sleep:{rng.choice([0, 0, 0.05, 0.2, 0.4]):g}") for n in range(500)]

        def one(job):
            account, profile = job
            nonce = f"{account}-{rng.random()}"
            response = client.post(RUNS, headers=bearer(account), json={
                "profile": profile, "args": ["echo", nonce], "timeout_seconds": 10})
            return nonce, response

        opened = events_server.streams_opened(RUN_REPLY)
        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(one, jobs))
        for nonce, response in results:
            assert response.status_code == 200, response.get_json()
            assert response.get_json()["stdout"] == f"echo {nonce}"
        assert events_server.streams_opened(RUN_REPLY) - opened >= 3  # it did reopen, several times
        assert events_server.open_streams(RUN_REPLY) in (1, 2)
        assert bus(app).registry.pending() == 0


def test_an_oversized_line_is_skipped_and_the_stream_carries_on(app, client, events_server, caplog):
    threads = [start_run(client, f"acct-{n}") for n in range(3)]
    stored = events_server.wait_published(RUN_REQUEST, count=3)
    opened = events_server.streams_opened(RUN_REPLY)
    reply_as_worker(events_server, stored[0], stdout="before")
    assert events_server.send_junk_line(RUN_REPLY, 20 * 1024 * 1024) == 1
    for request in stored[1:]:
        reply_as_worker(events_server, request, stdout="after")
    for thread, box in threads:
        thread.join(15)
        assert box["response"].status_code == 200
    assert sorted(box["response"].get_json()["stdout"] for _, box in threads) == ["after", "after", "before"]
    assert events_server.streams_opened(RUN_REPLY) == opened  # no reconnect
    assert "discarding a line over 16777216 bytes on the bus.containers.run.response stream" in caplog.text


READ_JUNK = """
import json, sys, threading
from bus_containers_provider.bus.client import EventsClient

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

client = EventsClient(sys.argv[1], sys.argv[2])
stream = client.stream("bus.containers.run.response", idle_timeout=30)
first = next(stream)
before = hwm()
print(json.dumps({"ready": True}), flush=True)
second = next(stream)
print(json.dumps({"ids": [first["id"], second["id"]], "growth": hwm() - before}), flush=True)
"""


def test_a_64_mib_line_is_read_in_bounded_memory(events_server):
    reader = subprocess.Popen([sys.executable, "-c", READ_JUNK, events_server.url, EVENTS_TOKEN],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert events_server.wait_for_streams(1, RUN_REPLY, timeout=10)
        post = {"Authorization": f"Bearer {WORKER_TOKEN}"}
        body = {"name": RUN_REPLY, "correlationId": "c", "payload": {}}
        requests.post(f"{events_server.url}/api/v1/events", json=body, headers=post, timeout=5)
        assert json.loads(reader.stdout.readline()) == {"ready": True}
        events_server.send_junk_line(RUN_REPLY, 64 * 1024 * 1024)
        requests.post(f"{events_server.url}/api/v1/events", json=body, headers=post, timeout=5)
        result = json.loads(reader.stdout.readline())
    finally:
        reader.kill()
        reader.wait(5)
        reader.stdout.close()
    assert result["ids"] == ["1", "2"]
    assert result["growth"] < 40 * 1024 * 1024, result


def test_a_late_reply_is_logged_once_without_its_payload(app, client, events_server, caplog):
    caplog.set_level(logging.INFO, logger="bus_containers_provider.bus")
    thread, box = start_run(client, timeout_seconds=1)
    [request] = events_server.wait_published(RUN_REQUEST, count=1)
    thread.join(10)
    assert box["response"].status_code == 503
    for _ in range(2):  # the worker's retried publish: a second copy
        reply_as_worker(events_server, request, stdout="private-output")
    wait_until(lambda: request["correlationId"] in caplog.text, what="the late reply's log line")
    assert events_server.wait_published(RUN_REPLY, count=2)
    run_probe = client.post(RUNS, headers=bearer(), json={"profile": "exit:0", "args": ["x"]})
    assert run_probe.status_code == 200  # both copies were read past: the stream is in order
    [line] = [r for r in caplog.records if request["correlationId"] in r.getMessage()]
    assert line.levelno == logging.INFO and RUN_REPLY in line.getMessage()
    assert "private-output" not in caplog.text


def test_retry_off_a_stream_that_never_opens_is_refused_at_once(events_server):
    """A first connect refused, with retry off: down now (nothing waits on it yet), not after the grace."""
    from bus_containers_provider import create_app, start, stop

    events_server.fail_streams(503)
    app = create_app(events_env(events_server, BUS_EVENTS_LISTENER_RETRY="0", BUS_EVENTS_LISTENER_DOWN_GRACE="30s"))
    start(app)
    try:
        wait_until(lambda: bus(app).registry.is_down(RUN_REPLY), what="the refused stream marked down")
        response = app.test_client().post(RUNS, headers=bearer(), json={"profile": "codex", "args": ["x"]})
        assert response.status_code == 503 and response.headers["Retry-After"]
    finally:
        events_server.reset_faults()
        stop(app)
