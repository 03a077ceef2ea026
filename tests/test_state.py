"""The run-control stores: one suite over the in-process store and the Redis store on a real redis-server."""
import json
import threading
import time
import types

import pytest
import redis

from bus_containers_provider.errors import StateUnavailable
from bus_containers_provider.state import create_store
from bus_containers_provider.state.base import BOUND, FINISHED, IN_FLIGHT, RUNNING
from bus_containers_provider.state.memory import MemoryStore
from bus_containers_provider.state.redis import PREFIX, RedisStore

LEASE = 0.3  # short, so that expiry is seen in a test; waits for it are polled, bounded
WAIT = 5.0
ANSWER = {"status": 200, "headers": {"Content-Type": "application/json"},
          "body": {"run_id": "run_1", "args": [], "env": {}, "stdout": "ä/\"\n", "exit_code": 0, "x": None}}


@pytest.fixture(params=["memory", "redis"])
def store(request):
    if request.param == "memory":
        yield MemoryStore()
        return
    server = request.getfixturevalue("redis_server")
    store = RedisStore(server.url)
    yield store
    store.close()


def eventually(condition, timeout=WAIT, every=0.02):
    """Poll `condition` until it is true, at most `timeout` seconds; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(every)


def race(count, action):
    """Run `action(i)` in `count` threads released at once; their results, in thread order."""
    barrier = threading.Barrier(count)
    results = [None] * count
    errors = []

    def worker(i):
        try:
            barrier.wait(WAIT)
            results[i] = action(i)
        except Exception as exc:  # reported below, with the test's failure
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT * 2)
    assert not any(thread.is_alive() for thread in threads)
    assert not errors, errors
    return results


# Idempotency records


def test_a_new_claim_is_in_flight_and_readable(store):
    claim = store.claim_key("scope-1", "fp-1", "run_1", 60)
    assert claim == (IN_FLIGHT, "fp-1", "run_1", True)
    assert store.read_key("scope-1") == (IN_FLIGHT, "fp-1", "run_1", False)
    assert store.read_key("scope-2") is None


def test_a_second_claim_gets_the_record_in_flight(store):
    store.claim_key("scope-1", "fp-1", "run_1", 60)
    claim = store.claim_key("scope-1", "fp-2", "run_2", 60)
    assert claim == (IN_FLIGHT, "fp-1", "run_1", False)


def test_a_retried_claim_of_the_same_run_is_still_its_own(store):
    store.claim_key("scope-1", "fp-1", "run_1", 60)
    assert store.claim_key("scope-1", "fp-1", "run_1", 60).new


def test_a_bound_key_names_its_run_for_everyone(store):
    store.claim_key("scope-1", "fp-1", "run_1", 60)
    store.bind_key("scope-1", "run_1", 60)
    bound = store.read_key("scope-1")
    assert bound == (BOUND, "fp-1", "run_1", False)
    assert store.claim_key("scope-1", "fp-1", "run_2", 60) == bound
    # Handed over is handed over: the run that bound it cannot claim it as new again.
    assert not store.claim_key("scope-1", "fp-1", "run_1", 60).new


def test_another_run_cannot_bind_or_drop_the_record(store):
    store.claim_key("scope-1", "fp-1", "run_1", 60)
    store.bind_key("scope-1", "run_2", 60)
    store.drop_key("scope-1", "run_2")
    assert store.read_key("scope-1") == (IN_FLIGHT, "fp-1", "run_1", False)


def test_bind_or_drop_of_no_record_creates_nothing(store):
    store.bind_key("scope-1", "run_1", 60)
    store.drop_key("scope-1", "run_1")
    assert store.read_key("scope-1") is None


def test_dropping_frees_the_key(store):
    store.claim_key("scope-1", "fp-1", "run_1", 60)
    store.drop_key("scope-1", "run_1")
    assert store.read_key("scope-1") is None
    assert store.claim_key("scope-1", "fp-2", "run_2", 60).new


def test_a_bound_key_is_dropped_only_by_its_own_run(store):
    # A publish that failed after the key was bound: the run was never handed over.
    store.claim_key("scope-1", "fp-1", "run_1", 60)
    store.bind_key("scope-1", "run_1", 60)
    store.drop_key("scope-1", "run_2")
    assert store.read_key("scope-1").state == BOUND
    store.drop_key("scope-1", "run_1")
    assert store.read_key("scope-1") is None


def test_an_in_flight_lease_expires_and_frees_the_key(store):
    store.claim_key("scope-1", "fp-1", "run_1", LEASE)
    assert eventually(lambda: store.read_key("scope-1") is None)
    assert store.claim_key("scope-1", "fp-2", "run_2", 60).new
    # The first run, back too late, cannot bind the second's record.
    store.bind_key("scope-1", "run_1", 60)
    assert store.read_key("scope-1") == (IN_FLIGHT, "fp-2", "run_2", False)


def test_a_bound_key_lives_for_its_ttl_not_its_lease(store):
    store.claim_key("scope-1", "fp-1", "run_1", LEASE)
    store.bind_key("scope-1", "run_1", 60)
    time.sleep(LEASE * 2)  # past the in-flight lease
    assert store.read_key("scope-1").state == BOUND
    store.claim_key("scope-2", "fp-1", "run_2", 60)
    store.bind_key("scope-2", "run_2", LEASE)
    assert eventually(lambda: store.read_key("scope-2") is None)


def test_renew_keeps_only_this_runs_in_flight_record(store):
    store.claim_key("mine", "fp", "run_1", LEASE)
    store.claim_key("theirs", "fp", "run_2", LEASE)
    store.claim_key("done", "fp", "run_3", 60)
    store.bind_key("done", "run_3", LEASE)
    renewals = [("mine", "run_1"), ("theirs", "run_1"), ("done", "run_3")]
    deadline = time.monotonic() + LEASE * 4
    while time.monotonic() < deadline:
        store.renew([], renewals, LEASE * 2)
        time.sleep(LEASE / 6)
    assert store.read_key("mine").run_id == "run_1"
    # Renewed by a run that does not hold it, or handed over: it expires as if never renewed.
    assert store.read_key("theirs") is None and store.read_key("done") is None
    assert eventually(lambda: store.read_key("mine") is None)


def test_racing_claims_make_exactly_one_new_record(store):
    claims = race(32, lambda i: store.claim_key("scope-1", f"fp-{i}", f"run_{i}", 60))
    [winner] = [claim for claim in claims if claim.new]
    assert all(claim.run_id == winner.run_id and claim.fingerprint == winner.fingerprint for claim in claims)


# Account run slots


def test_slots_up_to_the_limit(store):
    assert [store.acquire_slot("acct-a", f"run_{i}", 3, 60) for i in range(3)] == [(True, 1), (True, 2), (True, 3)]
    assert store.acquire_slot("acct-a", "run_3", 3, 60) == (False, 3)
    assert store.acquire_slot("acct-b", "run_3", 3, 60) == (True, 1)
    # A run that already holds a slot keeps it (a retried acquire), without taking a second.
    assert store.acquire_slot("acct-a", "run_0", 3, 60) == (True, 3)


def test_limit_zero_means_no_limit(store):
    results = [store.acquire_slot("acct-a", f"run_{i}", 0, 60) for i in range(50)]
    assert results == [(True, i + 1) for i in range(50)]


def test_release_frees_a_slot_and_twice_is_harmless(store):
    store.acquire_slot("acct-a", "run_1", 2, 60)
    store.acquire_slot("acct-a", "run_2", 2, 60)
    store.release_slot("acct-a", "run_1")
    store.release_slot("acct-a", "run_1")
    store.release_slot("acct-a", "never-held")
    store.release_slot("acct-none", "run_1")
    assert store.acquire_slot("acct-a", "run_3", 2, 60) == (True, 2)
    assert store.acquire_slot("acct-a", "run_4", 2, 60) == (False, 2)


def test_a_dead_holders_slot_expires(store):
    assert store.acquire_slot("acct-a", "dead", 1, LEASE) == (True, 1)
    assert store.acquire_slot("acct-a", "live", 1, 60) == (False, 1)
    assert eventually(lambda: store.acquire_slot("acct-a", "live", 1, 60)[0])
    assert store.acquire_slot("acct-a", "dead", 1, LEASE) == (False, 1)


def test_renew_keeps_a_live_holders_slot(store):
    lease = 0.6  # renewed every 0.1 s: a loaded machine has half a second of slack
    store.acquire_slot("acct-a", "live", 1, lease)
    deadline = time.monotonic() + lease * 3
    while time.monotonic() < deadline:
        store.renew([("acct-a", "live")], [], lease)
        assert store.acquire_slot("acct-a", "other", 1, 60) == (False, 1)
        time.sleep(0.1)
    assert eventually(lambda: store.acquire_slot("acct-a", "other", 1, 60)[0])


def test_renew_does_not_bring_back_an_expired_or_released_slot(store):
    store.acquire_slot("acct-a", "late", 1, LEASE)
    store.acquire_slot("acct-b", "released", 1, 60)
    store.release_slot("acct-b", "released")
    time.sleep(LEASE * 2)  # past the lease; nothing has swept it yet
    store.renew([("acct-a", "late"), ("acct-b", "released")], [], 60)
    assert store.acquire_slot("acct-a", "other", 1, 60) == (True, 1)
    assert store.acquire_slot("acct-b", "other", 1, 60) == (True, 1)


def test_renew_of_a_released_slot_beside_a_held_one_does_nothing(store):
    store.acquire_slot("acct-a", "kept", 2, 60)
    store.acquire_slot("acct-a", "released", 2, 60)
    store.release_slot("acct-a", "released")
    store.renew([("acct-a", "kept"), ("acct-a", "released")], [], 60)
    assert store.acquire_slot("acct-a", "other", 2, 60) == (True, 2)
    assert store.acquire_slot("acct-a", "third", 2, 60) == (False, 2)


def test_racing_acquires_take_exactly_the_limit(store):
    results = race(32, lambda i: store.acquire_slot("acct-a", f"run_{i}", 4, 60))
    taken = sorted(held for ok, held in results if ok)
    assert taken == [1, 2, 3, 4]
    assert all(held == 4 for ok, held in results if not ok)


def test_ping_answers(store):
    store.ping()


# Run records (§9)


def record(run_id="run_1", account="acct-a", created=1000.0, **extra):
    return {"state": RUNNING, "run_id": run_id, "owner_account_id": account, "correlation_id": f"c-{run_id}",
            "created": created, "deadline": created + 60, "args": [], "detached": True, **extra}


def test_a_record_reads_back_as_put(store):
    store.put_run(record(image="alpine"), 60, 600)
    assert store.read_run("run_1") == record(image="alpine")
    assert store.read_run("run_2") is None


def test_finishing_keeps_the_answer_exactly_and_happens_once(store):
    store.put_run(record(), 60, 600)
    assert store.finish_run("run_1", "acct-a", ANSWER, 600) is True
    finished = store.read_run("run_1")
    assert finished == dict(record(), state=FINISHED, answer=ANSWER)
    assert finished["answer"]["body"]["args"] == [] and finished["answer"]["body"]["env"] == {}
    # Exactly one completion: a second finish (another process, a late reply) changes nothing.
    assert store.finish_run("run_1", "acct-a", {"status": 503, "body": {}, "headers": {}}, 600) is False
    assert store.read_run("run_1")["answer"] == ANSWER
    assert store.finish_run("run_9", "acct-a", ANSWER, 600) is False


def test_racing_finishes_make_exactly_one_completion(store):
    store.put_run(record(), 60, 600)
    results = race(16, lambda i: store.finish_run("run_1", "acct-a", dict(ANSWER, status=200 + i), 600))
    assert results.count(True) == 1 and results.count(False) == 15
    assert store.read_run("run_1")["answer"]["status"] == 200 + results.index(True)


def test_a_forgotten_record_is_marked_or_gone(store):
    store.put_run(record("run_1"), 60, 600)
    store.put_run(record("run_2", created=1001.0), 60, 600)
    store.finish_run("run_1", "acct-a", ANSWER, 600, forget=True)
    store.finish_run("run_2", "acct-a", ANSWER, 0, forget=True)
    assert store.read_run("run_1")["forgotten"] is True
    assert store.read_run("run_2") is None
    assert store.list_runs("acct-a", 100) == []


def test_a_finished_record_lives_for_what_it_keeps(store):
    store.put_run(record(), 60, 600)
    store.finish_run("run_1", "acct-a", ANSWER, LEASE)
    assert store.read_run("run_1")["state"] == FINISHED
    assert eventually(lambda: store.read_run("run_1") is None)


def test_a_running_record_is_taken_only_once_its_lease_passes(store):
    store.put_run(record("run_1"), LEASE, 600)
    store.put_run(record("run_2"), 60, 600)
    assert store.take_runs(10, 60) == []
    taken = eventually(lambda: store.take_runs(10, 60))
    assert [r["run_id"] for r in taken] == ["run_1"]
    # Taken is held: nobody else takes it until the new lease passes.
    assert store.take_runs(10, 60) == []


def test_a_finished_record_is_never_taken(store):
    store.put_run(record("run_1"), LEASE, 600)
    store.finish_run("run_1", "acct-a", ANSWER, 600)
    time.sleep(LEASE * 2)
    assert store.take_runs(10, 60) == []


def test_one_record_is_taken_by_its_id(store):
    store.put_run(record("run_1"), LEASE, 600)
    store.put_run(record("run_2"), LEASE, 600)
    assert eventually(lambda: store.take_runs(10, 60, "run_2"))[0]["run_id"] == "run_2"
    assert store.take_runs(10, 60, "run_2") == []
    assert [r["run_id"] for r in store.take_runs(10, 60)] == ["run_1"]


def test_holding_renews_and_names_what_is_no_longer_held(store):
    store.put_run(record("run_1"), LEASE, 600)
    store.put_run(record("run_2"), LEASE, 600)
    store.finish_run("run_2", "acct-a", ANSWER, 600)
    deadline = time.monotonic() + LEASE * 4
    while time.monotonic() < deadline:
        assert store.hold_runs(["run_1", "run_2"], LEASE * 2) == ["run_2"]
        time.sleep(LEASE / 6)
    assert store.take_runs(10, 60) == []


def test_a_lease_of_zero_hands_the_record_over_at_once(store):
    store.put_run(record("run_1"), 60, 600)
    store.hold_runs(["run_1"], 0)
    assert [r["run_id"] for r in store.take_runs(10, 60)] == ["run_1"]


def test_a_dropped_record_is_gone_and_never_taken(store):
    store.put_run(record("run_1"), 0.001, 600)
    store.drop_run("run_1")
    time.sleep(0.01)
    assert store.read_run("run_1") is None and store.take_runs(10, 60) == []


def test_an_account_lists_its_own_records_newest_first(store):
    for n in range(5):
        store.put_run(record(f"run_{n}", created=1000.0 + n), 60, 600)
    store.put_run(record("run_x", account="acct-b", created=2000.0), 60, 600)
    assert [r["run_id"] for r in store.list_runs("acct-a", 3)] == ["run_4", "run_3", "run_2"]
    assert [r["run_id"] for r in store.list_runs("acct-b", 100)] == ["run_x"]
    assert store.list_runs("acct-c", 100) == []


# The Redis store only


@pytest.fixture
def redis_store(redis_server):
    store = RedisStore(redis_server.url)
    yield store
    store.close()


CALLS = {
    "claim_key": lambda store: store.claim_key("scope-1", "fp", "run_1", 60),
    "read_key": lambda store: store.read_key("scope-1"),
    "bind_key": lambda store: store.bind_key("scope-1", "run_1", 60),
    "drop_key": lambda store: store.drop_key("scope-1", "run_1"),
    "acquire_slot": lambda store: store.acquire_slot("acct-a", "run_1", 4, 60),
    "release_slot": lambda store: store.release_slot("acct-a", "run_1"),
    "renew": lambda store: store.renew([("acct-a", "run_1")], [("scope-1", "run_1")], 60),
    "ping": lambda store: store.ping(),
    "put_run": lambda store: store.put_run(record(), 60, 600),
    "read_run": lambda store: store.read_run("run_1"),
    "list_runs": lambda store: store.list_runs("acct-a", 100),
    "finish_run": lambda store: store.finish_run("run_1", "acct-a", ANSWER, 600),
    "hold_runs": lambda store: store.hold_runs(["run_1"], 60),
    "take_runs": lambda store: store.take_runs(10, 60),
    "drop_run": lambda store: store.drop_run("run_1"),
}


def test_two_stores_share_slots_and_keys(redis_server):
    first, second = RedisStore(redis_server.url), RedisStore(redis_server.url)
    try:
        assert first.acquire_slot("acct-a", "run_1", 2, 60) == (True, 1)
        assert second.acquire_slot("acct-a", "run_2", 2, 60) == (True, 2)
        assert first.acquire_slot("acct-a", "run_3", 2, 60) == (False, 2)
        second.release_slot("acct-a", "run_1")
        assert first.acquire_slot("acct-a", "run_3", 2, 60) == (True, 2)

        assert first.claim_key("scope-1", "fp", "run_1", 60).new
        assert not second.claim_key("scope-1", "fp", "run_2", 60).new
        first.bind_key("scope-1", "run_1", 60)
        assert second.read_key("scope-1") == (BOUND, "fp", "run_1", False)
    finally:
        first.close()
        second.close()


def test_two_stores_racing_take_exactly_the_limit(redis_server):
    stores = [RedisStore(redis_server.url), RedisStore(redis_server.url)]
    try:
        results = race(32, lambda i: stores[i % 2].acquire_slot("acct-a", f"run_{i}", 4, 60))
        assert sorted(held for ok, held in results if ok) == [1, 2, 3, 4]
        claims = race(32, lambda i: stores[i % 2].claim_key("scope-1", "fp", f"run_{i}", 60))
        assert sum(claim.new for claim in claims) == 1
    finally:
        for store in stores:
            store.close()


def test_records_are_json_and_an_idle_slot_set_expires(redis_store, redis_server):
    raw = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        redis_store.claim_key("scope-1", "fp", "run_1", 60)
        redis_store.bind_key("scope-1", "run_1", 60)
        assert json.loads(raw.get(f"{PREFIX}key:scope-1")) == {"state": BOUND, "fingerprint": "fp", "run_id": "run_1"}
        assert 0 < raw.pttl(f"{PREFIX}key:scope-1") <= 60_000

        redis_store.acquire_slot("acct-a", "short", 0, LEASE)
        redis_store.acquire_slot("acct-a", "long", 0, 60)
        assert 30_000 < raw.pttl(f"{PREFIX}slots:acct-a") <= 60_000  # the longest lease
        redis_store.release_slot("acct-a", "long")
        redis_store.acquire_slot("acct-b", "short", 0, LEASE)
        assert 0 < raw.pttl(f"{PREFIX}slots:acct-b") <= LEASE * 1000
        assert eventually(lambda: not raw.exists(f"{PREFIX}slots:acct-b"))
    finally:
        raw.close()


@pytest.mark.parametrize("method", list(CALLS))
def test_store_down_is_state_unavailable_then_back(redis_store, redis_server, method):
    call = CALLS[method]
    call(redis_store)  # connected, scripts loaded
    redis_server.stop()
    started = time.monotonic()
    with pytest.raises(StateUnavailable):
        call(redis_store)
    assert time.monotonic() - started < 2.0  # refused at once, not after a long timeout
    redis_server.start()  # back empty, without its script cache, on the same port
    call(redis_store)
    assert redis_store.acquire_slot("acct-z", "run_1", 1, 60) == (True, 1)


def test_a_restart_between_two_calls_is_not_seen(redis_store, redis_server):
    # The pooled connection is dead after the restart: it is replaced, not reported as a failure.
    assert redis_store.acquire_slot("acct-a", "run_1", 1, 60) == (True, 1)
    redis_server.stop()
    redis_server.start()
    assert redis_store.acquire_slot("acct-a", "run_1", 1, 60) == (True, 1)
    assert redis_store.claim_key("scope-1", "fp", "run_1", 60).new


def test_a_hung_store_is_state_unavailable_within_the_socket_timeout(redis_store, redis_server):
    redis_store.acquire_slot("acct-a", "run_1", 4, 60)
    redis_server.pause()
    try:
        started = time.monotonic()
        with pytest.raises(StateUnavailable):
            redis_store.acquire_slot("acct-a", "run_2", 4, 60)
        assert time.monotonic() - started < 5.0  # bounded by the socket timeout, not hung
    finally:
        redis_server.resume()
    assert redis_store.acquire_slot("acct-a", "run_3", 4, 60)[0]


def test_the_error_never_carries_the_store_password(redis_server):
    store = RedisStore(f"redis://:secret-password@127.0.0.1:{redis_server.port}/0")
    redis_server.stop()
    with pytest.raises(StateUnavailable) as caught:
        store.ping()
    assert "secret-password" not in str(caught.value)
    assert caught.value.headers["Retry-After"]
    store.close()


def test_create_store_picks_the_adapter(redis_server):
    assert isinstance(create_store(types.SimpleNamespace(state_url=None)), MemoryStore)
    store = create_store(types.SimpleNamespace(state_url=redis_server.url))
    try:
        assert isinstance(store, RedisStore)
        store.ping()
    finally:
        store.close()


def test_the_in_process_store_forgets_the_oldest_bound_keys_past_its_bound():
    store = MemoryStore(max_records=3)
    for n in range(5):
        store.claim_key(f"s{n}", "f", f"r{n}", 30)
        store.bind_key(f"s{n}", f"r{n}", 3600)
    assert [store.read_key(f"s{n}") is not None for n in range(5)] == [False, False, True, True, True]
    store.claim_key("in-flight", "f", "r", 30)
    assert store.read_key("in-flight") is not None and store.read_key("s2") is None


class Clock:
    """The in-process store's clock, moved by hand: its lease edges are the Redis store's (PX, scores <= now)."""

    def __init__(self, now=100.0):
        self.now = now

    def __call__(self):
        return self.now


def test_a_record_is_gone_the_moment_its_lease_ends():
    clock = Clock()
    store = MemoryStore(clock=clock)
    store.claim_key("s", "fp", "run_1", 10)
    clock.now = 109.999
    assert store.read_key("s").run_id == "run_1"
    clock.now = 110.0
    assert store.read_key("s") is None
    assert store.claim_key("s", "fp", "run_2", 10).new


def test_a_lease_that_ends_now_is_not_renewed():
    clock = Clock()
    store = MemoryStore(clock=clock)
    store.acquire_slot("acct-a", "run_1", 1, 10)
    store.claim_key("s", "fp", "run_1", 10)
    clock.now = 110.0
    store.renew([("acct-a", "run_1")], [("s", "run_1")], 10)
    assert store.acquire_slot("acct-a", "run_2", 1, 10) == (True, 1)
    assert store.claim_key("s", "fp", "run_2", 10).new


def test_in_flight_records_are_kept_past_the_bound():
    store = MemoryStore(max_records=2)
    assert all(store.claim_key(f"s{n}", "fp", f"run_{n}", 30).new for n in range(3))
    assert [store.read_key(f"s{n}").run_id for n in range(3)] == ["run_0", "run_1", "run_2"]


def test_the_in_process_store_keeps_running_records_past_its_bound():
    store = MemoryStore(max_records=2)
    for n in range(3):
        store.put_run(record(f"run_{n}", created=1000.0 + n), 60, 600)
    store.finish_run("run_0", "acct-a", ANSWER, 600)
    store.put_run(record("run_3", created=1003.0), 60, 600)
    assert store.read_run("run_0") is None
    assert [store.read_run(f"run_{n}")["state"] for n in (1, 2, 3)] == [RUNNING] * 3
