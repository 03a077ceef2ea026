"""The run-control stores: one suite over the in-process store and the Redis store on a real redis-server."""
import json
import threading
import time
import types

import pytest
import redis

from bus_containers_provider.errors import StateUnavailable
from bus_containers_provider.state import create_store
from bus_containers_provider.state.base import DONE, IN_FLIGHT
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
    assert claim == (IN_FLIGHT, "fp-1", "run_1", None, True)
    assert store.read_key("scope-1") == (IN_FLIGHT, "fp-1", "run_1", None, False)
    assert store.read_key("scope-2") is None


def test_a_second_claim_gets_the_record_in_flight(store):
    store.claim_key("scope-1", "fp-1", "run_1", 60)
    claim = store.claim_key("scope-1", "fp-2", "run_2", 60)
    assert claim == (IN_FLIGHT, "fp-1", "run_1", None, False)


def test_a_retried_claim_of_the_same_run_is_still_its_own(store):
    store.claim_key("scope-1", "fp-1", "run_1", 60)
    assert store.claim_key("scope-1", "fp-1", "run_1", 60).new


def test_a_finished_record_carries_its_answer_exactly(store):
    store.claim_key("scope-1", "fp-1", "run_1", 60)
    store.finish_key("scope-1", "run_1", ANSWER, 60)
    done = store.read_key("scope-1")
    assert done == (DONE, "fp-1", "run_1", ANSWER, False)
    assert done.answer["body"]["args"] == [] and done.answer["body"]["env"] == {}
    assert store.claim_key("scope-1", "fp-1", "run_2", 60) == done
    # Done is done: the run that finished it cannot claim it as new again.
    assert not store.claim_key("scope-1", "fp-1", "run_1", 60).new


def test_another_run_cannot_finish_or_drop_the_record(store):
    store.claim_key("scope-1", "fp-1", "run_1", 60)
    store.finish_key("scope-1", "run_2", ANSWER, 60)
    store.drop_key("scope-1", "run_2")
    assert store.read_key("scope-1") == (IN_FLIGHT, "fp-1", "run_1", None, False)


def test_finish_or_drop_of_no_record_creates_nothing(store):
    store.finish_key("scope-1", "run_1", ANSWER, 60)
    store.drop_key("scope-1", "run_1")
    assert store.read_key("scope-1") is None


def test_dropping_frees_the_key(store):
    store.claim_key("scope-1", "fp-1", "run_1", 60)
    store.drop_key("scope-1", "run_1")
    assert store.read_key("scope-1") is None
    assert store.claim_key("scope-1", "fp-2", "run_2", 60).new


def test_a_finished_record_is_not_dropped(store):
    store.claim_key("scope-1", "fp-1", "run_1", 60)
    store.finish_key("scope-1", "run_1", ANSWER, 60)
    store.drop_key("scope-1", "run_1")
    assert store.read_key("scope-1").state == DONE


def test_an_in_flight_lease_expires_and_frees_the_key(store):
    store.claim_key("scope-1", "fp-1", "run_1", LEASE)
    assert eventually(lambda: store.read_key("scope-1") is None)
    assert store.claim_key("scope-1", "fp-2", "run_2", 60).new
    # The first run, back too late, cannot finish the second's record.
    store.finish_key("scope-1", "run_1", ANSWER, 60)
    assert store.read_key("scope-1") == (IN_FLIGHT, "fp-2", "run_2", None, False)


def test_a_finished_record_lives_for_its_ttl_not_its_lease(store):
    store.claim_key("scope-1", "fp-1", "run_1", LEASE)
    store.finish_key("scope-1", "run_1", ANSWER, 60)
    time.sleep(LEASE * 2)  # past the in-flight lease
    assert store.read_key("scope-1").state == DONE
    store.claim_key("scope-2", "fp-1", "run_2", 60)
    store.finish_key("scope-2", "run_2", ANSWER, LEASE)
    assert eventually(lambda: store.read_key("scope-2") is None)


def test_renew_keeps_only_this_runs_in_flight_record(store):
    store.claim_key("mine", "fp", "run_1", LEASE)
    store.claim_key("theirs", "fp", "run_2", LEASE)
    store.claim_key("done", "fp", "run_3", 60)
    store.finish_key("done", "run_3", ANSWER, LEASE)
    renewals = [("mine", "run_1"), ("theirs", "run_1"), ("done", "run_3")]
    deadline = time.monotonic() + LEASE * 4
    while time.monotonic() < deadline:
        store.renew([], renewals, LEASE * 2)
        time.sleep(LEASE / 6)
    assert store.read_key("mine").run_id == "run_1"
    # Renewed by a run that does not hold it, or no longer in flight: it expires as if never renewed.
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


# The Redis store only


@pytest.fixture
def redis_store(redis_server):
    store = RedisStore(redis_server.url)
    yield store
    store.close()


CALLS = {
    "claim_key": lambda store: store.claim_key("scope-1", "fp", "run_1", 60),
    "read_key": lambda store: store.read_key("scope-1"),
    "finish_key": lambda store: store.finish_key("scope-1", "run_1", ANSWER, 60),
    "drop_key": lambda store: store.drop_key("scope-1", "run_1"),
    "acquire_slot": lambda store: store.acquire_slot("acct-a", "run_1", 4, 60),
    "release_slot": lambda store: store.release_slot("acct-a", "run_1"),
    "renew": lambda store: store.renew([("acct-a", "run_1")], [("scope-1", "run_1")], 60),
    "ping": lambda store: store.ping(),
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
        first.finish_key("scope-1", "run_1", ANSWER, 60)
        assert second.read_key("scope-1").answer == ANSWER
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
        redis_store.finish_key("scope-1", "run_1", ANSWER, 60)
        assert json.loads(raw.get(f"{PREFIX}key:scope-1")) == {
            "state": DONE, "fingerprint": "fp", "run_id": "run_1", "answer": ANSWER}
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


def test_the_in_process_store_forgets_the_oldest_answers_past_its_bound():
    from bus_containers_provider.state.memory import MemoryStore

    store = MemoryStore(max_records=3)
    for n in range(5):
        store.claim_key(f"s{n}", "f", f"r{n}", 30)
        store.finish_key(f"s{n}", f"r{n}", {"status": 200, "body": {}, "headers": {}}, 3600)
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
