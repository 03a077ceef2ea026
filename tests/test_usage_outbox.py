"""The usage outbox in the shared store: records a killed or stopped process held are sent by another."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bus_containers_provider.state.memory import MemoryStore
from bus_containers_provider.state.redis import RedisStore
from conftest import EVENTS_TOKEN, events_env
from inflight import wait_until
from processes import ROOT

LEASE = 0.3
FINISHED = "container_run_finished"


@pytest.fixture(params=["memory", "redis"])
def store(request):
    if request.param == "memory":
        yield MemoryStore()
        return
    store = RedisStore(request.getfixturevalue("redis_server").url)
    yield store
    store.close()


def record(n):
    return {"event_type": FINISHED, "event_id": f"run_{n}:{FINISHED}", "account_id": "acct-a",
            "occurred_at": "2026-01-01T00:00:00.000Z", "data": {"run_id": f"run_{n}", "image": "alpine", "x": []}}


def test_a_held_record_is_not_taken_until_its_lease_passes(store):
    store.outbox_put("e1", record(1), LEASE)
    assert store.outbox_take(10, 60) == []
    wait_until(lambda: store.outbox_take(10, 60) == [record(1)], what="the lease passing")
    assert store.outbox_take(10, 60) == []  # now held by the taker


def test_renewed_records_stay_held_and_done_ones_are_gone(store):
    store.outbox_put("e1", record(1), LEASE)
    store.outbox_put("e2", record(2), LEASE)
    store.outbox_done("e2")
    store.outbox_done("never-kept")
    deadline = time.monotonic() + 3 * LEASE
    while time.monotonic() < deadline:
        store.outbox_hold(["e1", "e2"], LEASE)  # e2 is done: holding it does not bring it back
        assert store.outbox_take(10, 60) == []
        time.sleep(LEASE / 5)
    wait_until(lambda: store.outbox_take(10, 60) == [record(1)], what="e1 once no longer renewed")


def test_take_is_bounded(store):
    for n in range(5):
        store.outbox_put(f"e{n}", record(n), 0.001)
    time.sleep(0.01)
    assert len(store.outbox_take(3, 60)) == 3
    assert len(store.outbox_take(3, 60)) == 2


def test_two_processes_never_take_the_same_record(redis_server):
    first, second = RedisStore(redis_server.url), RedisStore(redis_server.url)
    try:
        for n in range(50):
            first.outbox_put(f"e{n}", record(n), 0.001)
        time.sleep(0.01)
        taken = first.outbox_take(30, 60) + second.outbox_take(30, 60) + first.outbox_take(30, 60)
        assert sorted(r["event_id"] for r in taken) == sorted(record(n)["event_id"] for n in range(50))
    finally:
        first.close()
        second.close()


SENDER = """
import signal, sys, threading
from bus_containers_provider.bus import Bus
from bus_containers_provider.config import load_settings
from bus_containers_provider.state.redis import RedisStore
from bus_containers_provider.usage import EventsUsage
import json

EventsUsage.OUTBOX_LEASE, EventsUsage.OUTBOX_EVERY = 2.0, 0.2
env, state_url, count = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
settings = load_settings(env)
bus = Bus(settings)
usage = EventsUsage(bus, settings.request_timeout, outbox=RedisStore(state_url), flush_timeout=0.5)
bus.listen_for(*usage.reply_names)
bus.start()
assert bus.wait_connected(10)
usage.start()
done = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: done.set())
for n in range(count):
    usage.record_later({"event_type": "container_run_finished", "event_id": f"run_{n}:container_run_finished",
                        "account_id": "acct-a", "occurred_at": "2026-01-01T00:00:00.000Z",
                        "data": {"run_id": f"run_{n}", "image": "alpine"}})
print("recording", flush=True)
done.wait(60)
usage.stop()
bus.stop()
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_records_a_process_held_when_it_died_are_sent_by_another_exactly_once(
        events_server, responder, redis_server, sig):
    from bus_containers_provider.bus import Bus
    from bus_containers_provider.config import load_settings
    from bus_containers_provider.usage import EventsUsage

    count = 5
    responder.ignore_usage[FINISHED] = count  # the first process never gets its confirmations
    env = dict(events_env(events_server, BUS_CONTAINERS_USAGE_BACKEND="events"), BUS_API_TOKEN=EVENTS_TOKEN)
    with subprocess.Popen([sys.executable, "-c", SENDER, json.dumps(env), redis_server.url, str(count)], cwd=ROOT,
                          stdout=subprocess.PIPE, text=True) as sender:
        try:
            assert sender.stdout.readline().strip() == "recording"
            events_server.wait_published("bus.usage.record.request", count=count, timeout=10)
            os.kill(sender.pid, sig)
            sender.wait(15)
        finally:
            if sender.poll() is None:
                sender.kill()
                sender.wait(5)
    assert responder.ignore_usage[FINISHED] == 0 and responder.usage_records == []

    settings = load_settings(env)
    bus = Bus(settings)
    usage = EventsUsage(bus, settings.request_timeout, outbox=RedisStore(redis_server.url))
    usage.OUTBOX_LEASE, usage.OUTBOX_EVERY = 2.0, 0.2
    bus.listen_for(*usage.reply_names)
    bus.start()
    try:
        assert bus.wait_connected(10)
        usage.start()
        wait_until(lambda: len(responder.usage_records) >= count, timeout=20, what="the other process sending them")
        time.sleep(3 * usage.OUTBOX_EVERY)  # a record sent twice would show up now
        usage.stop()
    finally:
        bus.stop()
    assert sorted(r["event_id"] for r in responder.usage_records) == sorted(
        f"run_{n}:{FINISHED}" for n in range(count))


def test_a_record_is_takeable_the_moment_its_lease_ends():
    # As in Redis (a score at most the server's now is due): the in-process store on a clock of its own.
    now = [100.0]
    store = MemoryStore(clock=lambda: now[0])
    store.outbox_put("e1", record(1), 10)
    now[0] = 109.999
    assert store.outbox_take(10, 10) == []
    now[0] = 110.0
    assert store.outbox_take(10, 10) == [record(1)]
