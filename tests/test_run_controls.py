"""Run controls (CONTRACT §7) through the app: Idempotency-Key, account slots, run capacity."""
import concurrent.futures
import select
import socket
import threading

import pytest

from bus_containers_provider.controls import LEASE_SECONDS, Capacity, RunControls, caller_gone, never
from bus_containers_provider.errors import Conflict, IdempotencyKeyReused, TooManyRuns, Unavailable
from bus_containers_provider.state.memory import MemoryStore
from bus_containers_provider.state.redis import RedisStore
from conftest import Changes, bearer, connected, env, events_env
from inflight import wait_until

RUNS = "/api/v1/containers/runs"
RUN_NAME = "bus.containers.run.request"
USAGE = "bus.usage.record.request"
BILLING = "bus.billing.entitlement.check.request"
BODY = {"image": "alpine", "command": ["echo", "hi"], "timeout_seconds": 20}


def post(client, body=BODY, key=None, account="acct-a", **headers):
    if key is not None:
        headers["Idempotency-Key"] = key
    return client.post(RUNS, json=body, headers={**bearer(account), **headers})


def requests_published(events_server):
    return [e["name"] for e in events_server.published() if e["name"].endswith(".request")]


def error_type(response):
    return response.get_json()["error"]["type"]


class TestIdempotencyKeyStatic:
    """The key's rules on the static backend: replay, fingerprint, accounts, header syntax."""

    def test_a_retry_replays_the_first_answer_without_a_second_run(self, client):
        first = post(client, key="retry-1")
        second = post(client, key="retry-1")
        assert first.status_code == second.status_code == 200
        assert second.get_json() == first.get_json()
        assert second.headers["Idempotent-Replayed"] == "true"
        assert "Idempotent-Replayed" not in first.headers
        runs = client.get(RUNS, headers=bearer()).get_json()["items"]
        assert [item["id"] for item in runs] == [first.get_json()["run_id"]]

    def test_without_a_key_every_request_is_a_run(self, client):
        assert post(client).get_json()["run_id"] != post(client).get_json()["run_id"]

    def test_the_fingerprint_is_the_validated_body_in_canonical_form(self, client):
        first = post(client, {"profile": "codex", "args": ["a", "b"], "timeout_seconds": 5}, key="k")
        # Same body: other key order, and `command` where the first said `args`.
        again = post(client, {"timeout_seconds": 5, "command": ["a", "b"], "profile": "codex"}, key="k")
        assert again.status_code == 200 and again.get_json()["run_id"] == first.get_json()["run_id"]
        raw = client.post(RUNS, data='{ "timeout_seconds" :5,"profile":"codex", "args":["a","b"]}',
                          headers={**bearer(), "Idempotency-Key": "k", "Content-Type": "application/json"})
        assert raw.get_json()["run_id"] == first.get_json()["run_id"]

    def test_the_order_of_env_entries_does_not_matter(self, client):
        first = post(client, dict(BODY, env={"A": "1", "B": "2", "C": "3"}), key="env-order")
        again = post(client, dict(BODY, env={"C": "3", "A": "1", "B": "2"}), key="env-order")
        assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
        assert again.get_json()["run_id"] == first.get_json()["run_id"]

    @pytest.mark.parametrize("account,command", [("acct-a", ["echo", "\ud800"]), ("acct-\udc00", ["echo", "hi"])])
    def test_a_lone_surrogate_in_the_body_or_the_account_is_fingerprinted_not_a_500(self, client, account, command):
        """JSON may escape a lone surrogate (\\ud800) in a string, and a verified token's sub too: no 500 (§3)."""
        from test_auth import auth, claims, craft

        # Signed by hand: the JSON of the claims escapes the surrogate as \\udc00, as any JSON encoder may.
        headers = {**auth(craft({"alg": "HS256", "typ": "JWT"}, claims(sub=account))), "Idempotency-Key": "surrogate"}
        body = dict(BODY, command=command)
        first = client.post(RUNS, json=body, headers=headers)
        again = client.post(RUNS, json=body, headers=headers)
        assert first.status_code == again.status_code == 200
        assert again.headers["Idempotent-Replayed"] == "true"
        assert again.get_json()["run_id"] == first.get_json()["run_id"]

    @pytest.mark.parametrize("other", [
        {"image": "alpine", "command": ["echo", "other"], "timeout_seconds": 20},
        {"image": "alpine", "command": ["echo", "hi"], "timeout_seconds": 21},
        {"image": "alpine", "command": ["echo", "hi"], "timeout_seconds": 20, "env": {"A": "1"}},
        {"image": "alpine", "command": ["echo", "hi"], "timeout_seconds": 20, "stdin": ""},
    ])
    def test_the_same_key_with_another_body_is_422(self, client, other):
        first = post(client, key="k-422")
        reused = post(client, other, key="k-422")
        assert reused.status_code == 422 and error_type(reused) == "idempotency_key_reused"
        # The first answer is still there for the first body.
        assert post(client, key="k-422").get_json()["run_id"] == first.get_json()["run_id"]

    def test_keys_belong_to_the_account(self, client):
        mine = post(client, key="shared", account="acct-a").get_json()
        theirs = post(client, key="shared", account="acct-b")
        assert theirs.status_code == 200 and "Idempotent-Replayed" not in theirs.headers
        assert theirs.get_json()["run_id"] != mine["run_id"]
        assert theirs.get_json()["owner_account_id"] == "acct-b"

    @pytest.mark.parametrize("header", ["", " ", '""', "a b", "é", "x" * 256, '"bad\\escape"',
                                        '"inner"quote"', "tab\there", '"trailing\\"'])
    def test_a_malformed_key_is_400_before_anything_runs(self, client, header):
        response = post(client, key=header)
        assert response.status_code == 400 and error_type(response) == "bad_request"
        assert client.get(RUNS, headers=bearer()).get_json()["items"] == []

    @pytest.mark.parametrize("plain,quoted", [("abc", '"abc"'), ('a"b', '"a\\"b"'), ("a\\b", '"a\\\\b"')])
    def test_a_structured_field_string_is_unquoted_first(self, client, plain, quoted):
        first = post(client, key=plain)
        assert post(client, key=quoted).get_json()["run_id"] == first.get_json()["run_id"]

    def test_the_longest_key_and_every_printable_character_are_accepted(self, client):
        printable = "".join(chr(c) for c in range(0x21, 0x7F))
        for key in ("x" * 255, printable):
            assert post(client, key=key).status_code == 200

    def test_a_400_is_not_remembered(self, client):
        bad = post(client, {"image": "alpine"}, key="after-400")
        assert bad.status_code == 400
        good = post(client, key="after-400")
        assert good.status_code == 200 and "Idempotent-Replayed" not in good.headers


class TestIdempotencyKeyEvents:
    """What is remembered once a run was published, and what is not."""

    @pytest.fixture
    def app_env(self, events_server, responder):
        # The responder outlives the app: the app's stop flushes usage records it must confirm.
        return events_env(events_server, BUS_CONTAINERS_USAGE_BACKEND="events",
                          BUS_CONTAINERS_BILLING_BACKEND="events", BUS_CONTAINERS_RUN_TIMEOUT_GRACE="200ms")

    @pytest.fixture
    def client(self, app, responder):
        return connected(app).test_client()

    def test_a_replay_publishes_nothing(self, client, events_server):
        first = post(client, key="once")
        events_server.wait_published(USAGE, 2, timeout=5)  # the first run's finished record, sent after its answer
        published = requests_published(events_server)
        second = post(client, key="once")
        assert second.get_json() == first.get_json() and second.headers["Idempotent-Replayed"] == "true"
        assert requests_published(events_server) == published  # no run, no entitlement check, no usage record
        assert len(events_server.published(RUN_NAME)) == 1

    def test_a_malformed_reply_is_remembered_and_names_the_run(self, client, events_server):
        body = {"profile": "malformed", "args": ["x"], "timeout_seconds": 5}
        first = post(client, body, key="bad-reply")
        assert first.status_code == 502 and error_type(first) == "bad_gateway"
        run_id = first.get_json()["error"]["details"]["run_id"]
        assert events_server.published(RUN_NAME)[0]["payload"]["run_id"] == run_id
        again = post(client, body, key="bad-reply")
        assert again.status_code == 502 and again.get_json() == first.get_json()
        assert again.headers["Idempotent-Replayed"] == "true"
        assert len(events_server.published(RUN_NAME)) == 1

    def test_a_reply_timeout_is_remembered_with_retry_after(self, client, events_server):
        body = {"profile": "never", "args": ["x"], "timeout_seconds": 1}
        first = post(client, body, key="slow")
        assert first.status_code == 503 and first.headers["Retry-After"].isdigit()
        assert first.get_json()["error"]["details"]["run_id"].startswith("run_")
        again = post(client, body, key="slow")
        assert again.status_code == 503 and again.get_json() == first.get_json()
        assert again.headers["Retry-After"] == first.headers["Retry-After"]
        assert len(events_server.published(RUN_NAME)) == 1

    def test_a_billing_denial_is_not_remembered(self, client, events_server, responder):
        responder.billing["acct-a"] = {"allowed": False, "reason": "billing_required", "action": "setup_billing"}
        denied = post(client, key="pay-first")
        assert denied.status_code == 402
        del responder.billing["acct-a"]
        paid = post(client, key="pay-first")
        assert paid.status_code == 200 and "Idempotent-Replayed" not in paid.headers
        assert len(events_server.published(RUN_NAME)) == 1

    def test_a_usage_failure_before_the_run_is_not_remembered(self, client, events_server, responder):
        responder.modes[USAGE] = "error"
        refused = post(client, key="usage-first")
        assert refused.status_code == 503 and refused.headers["Retry-After"].isdigit()
        assert events_server.published(RUN_NAME) == []
        responder.modes[USAGE] = "ok"
        assert post(client, key="usage-first").status_code == 200

    def test_a_retry_during_the_first_run_joins_it(self, app, client, events_server):
        body = {"profile": "sleep:1", "args": ["joined"], "timeout_seconds": 10}
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            first = pool.submit(post, app.test_client(), body, "joined")
            assert events_server.wait_published(RUN_NAME, 1, timeout=5)
            retries = [pool.submit(post, app.test_client(), body, "joined") for _ in range(3)]
            answers = [first.result(timeout=15)] + [r.result(timeout=15) for r in retries]
        assert {a.status_code for a in answers} == {200}
        assert len({a.get_json()["run_id"] for a in answers}) == 1
        assert [a.headers.get("Idempotent-Replayed") for a in answers] == [None, "true", "true", "true"]
        assert len(events_server.published(RUN_NAME)) == 1
        usage = [e["payload"]["event_type"] for e in events_server.published(USAGE)]
        assert usage.count("container_run_requested") == 1


class TestJoinWithoutCapacity:
    @pytest.fixture
    def app_env(self, events_server):
        # Three threads keep two for everything else: room for exactly one run.
        return events_env(events_server, BUS_CONTAINERS_THREADS="3")

    def test_a_retry_that_cannot_wait_is_409_with_retry_after(self, app, responder, events_server):
        connected(app)
        body = {"profile": "sleep:1", "args": ["x"], "timeout_seconds": 10}
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(post, app.test_client(), body, "busy")
            assert events_server.wait_published(RUN_NAME, 1, timeout=5)
            retry = post(app.test_client(), body, "busy")
            other = post(app.test_client(), body, "another-key")
            assert first.result(timeout=15).status_code == 200
        assert retry.status_code == 409 and error_type(retry) == "conflict"
        assert int(retry.headers["Retry-After"]) >= 1
        assert retry.get_json()["error"]["details"]["run_id"] == first.result().get_json()["run_id"]
        # A new run beyond capacity is a 503 at once, never queued.
        assert other.status_code == 503 and int(other.headers["Retry-After"]) >= 1
        assert len(events_server.published(RUN_NAME)) == 1


class TestAccountSlots:
    @pytest.fixture
    def app_env(self, events_server, responder):
        # The responder outlives the app: the app's stop flushes usage records it must confirm.
        # A short grace: the reply-timeout case waits its 1 s run plus this, three times over.
        return events_env(events_server, BUS_CONTAINERS_MAX_RUNS_PER_ACCOUNT="2",
                          BUS_CONTAINERS_USAGE_BACKEND="events", BUS_CONTAINERS_BILLING_BACKEND="events",
                          BUS_CONTAINERS_RUN_TIMEOUT_GRACE="200ms")

    @pytest.fixture
    def client(self, app, responder):
        return connected(app).test_client()

    def test_a_saturated_account_gets_429_while_another_still_runs(self, app, client, events_server):
        hold = {"profile": "sleep:1.5", "args": ["x"], "timeout_seconds": 10}
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            held = [pool.submit(post, app.test_client(), hold) for _ in range(2)]
            assert events_server.wait_published(RUN_NAME, 2, timeout=5)
            published = requests_published(events_server)
            refused = post(client)
            assert requests_published(events_server) == published  # no billing, usage or run for a 429
            other = post(client, account="acct-b")
            assert [f.result(timeout=15).status_code for f in held] == [200, 200]
        assert refused.status_code == 429 and error_type(refused) == "too_many_runs"
        assert int(refused.headers["Retry-After"]) >= 1
        assert refused.get_json()["error"]["details"] == {"limit": 2, "in_flight": 2}
        assert other.status_code == 200
        assert post(client).status_code == 200  # the slots came back

    @pytest.mark.parametrize("profile,status", [("malformed", 502), ("never", 503), ("wrong-owner", 403),
                                                ("error", 502)])
    def test_a_slot_is_released_on_every_error(self, client, profile, status):
        body = {"profile": profile, "args": ["x"], "timeout_seconds": 1}
        for _ in range(3):  # more than the limit: a leaked slot would make the third a 429
            assert post(client, body).status_code == status
        assert post(client).status_code == 200

    def test_a_429_is_not_remembered_under_its_key(self, app, client, events_server):
        hold = {"profile": "sleep:1", "args": ["x"], "timeout_seconds": 10}
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            held = [pool.submit(post, app.test_client(), hold) for _ in range(2)]
            assert events_server.wait_published(RUN_NAME, 2, timeout=5)
            assert post(client, key="later").status_code == 429
            [f.result(timeout=15) for f in held]
        later = post(client, key="later")
        assert later.status_code == 200 and "Idempotent-Replayed" not in later.headers


@pytest.mark.parametrize("app_env", [env(BUS_CONTAINERS_MAX_RUNS_PER_ACCOUNT="0")])
def test_limit_zero_means_no_limit(app, client):
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda _: post(app.test_client()).status_code, range(16)))
    assert statuses == [200] * 16


def test_readiness_names_nothing_without_a_shared_store(client):
    assert client.get("/readyz").status_code == 200


def test_capacity_is_per_worker_and_released(app):
    capacity = app.extensions["bus_containers"].controls.capacity
    assert capacity.size == 28  # 32 threads, 4 kept for everything that is not a run
    release = threading.Event()
    with capacity.hold():
        assert capacity.in_use == 1
        release.set()
    assert capacity.in_use == 0


def test_an_answer_the_store_cannot_keep_is_still_answered(app, client):
    from bus_containers_provider.errors import StateUnavailable

    def unreachable(*args, **kwargs):
        raise StateUnavailable()

    app.extensions["bus_containers"].controls.store.finish_key = unreachable
    response = post(client, key="store-went-away")
    assert response.status_code == 200 and response.get_json()["status"] == "succeeded"


def test_an_unreachable_store_refuses_the_run_before_it_starts(app, client):
    from bus_containers_provider.errors import StateUnavailable

    def unreachable(*args, **kwargs):
        raise StateUnavailable()

    app.extensions["bus_containers"].controls.store.claim_key = unreachable
    response = post(client, key="no-store")
    assert response.status_code == 503 and int(response.headers["Retry-After"]) >= 1
    assert client.get(RUNS, headers=bearer()).get_json()["items"] == []


class TestCancelWithTheEventsApiDown:
    @pytest.fixture
    def app_env(self, events_server):
        return events_env(events_server, BUS_CONTAINERS_USAGE_BACKEND="memory")

    def test_a_cancelled_run_is_recorded_failed_even_when_its_cancel_cannot_be_published(
            self, app, events_server, responder):
        """§7: the caller gone, the run is recorded cancelled whether or not the delete request gets out."""
        from bus_containers_provider.backends import RunRequest
        from bus_containers_provider.errors import RunCancelled

        provider = connected(app).extensions["bus_containers"]
        run = RunRequest(run_id="run_gone", owner_account_id="acct-a", profile="never", command=["x"],
                         timeout_seconds=20)
        left = threading.Event()

        def gone():
            return "the caller went away" if left.is_set() else None

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            with app.app_context():
                waiting = pool.submit(provider.run, run, None, gone)
                assert events_server.wait_published(RUN_NAME, 1, timeout=5)
                events_server.fail_publish(503)  # the delete request will not get out
                left.set()
                answer = waiting.result(timeout=10)
        assert answer.status == 503 and answer.body["error"]["details"] == {"run_id": "run_gone"}
        events_server.reset_faults()
        failed = [r for r in provider.usage.records if r["event_type"] == "container_run_failed"]
        assert [(r["data"]["run_id"], r["data"]["reason"]) for r in failed] == [("run_gone", "cancelled")]
        assert all(e["name"] != "bus.containers.delete.request" for e in events_server.published())


# RunControls and the caller check on their own: paths the app reaches only under gunicorn or in a race.

ANSWER = {"status": 200, "body": {"run_id": "run_1"}, "headers": {}}


def controls_over(store):
    return RunControls(store, max_runs_per_account=0, run_capacity=4, idempotency_ttl=60)


def first_and_retry(controls, fingerprint="fp"):
    first = controls.claim("acct-a", "k", fingerprint, "run_1")
    retry = controls.claim("acct-a", "k", fingerprint, "run_2")
    assert first.new and retry.holder == "run_1"
    return first, retry


class TestJoin:
    def test_a_retry_that_cannot_wait_for_the_first_run_is_409_naming_it(self):
        controls = controls_over(MemoryStore())
        _, retry = first_and_retry(controls)
        with pytest.raises(Conflict) as refused:
            controls.join(retry, "fp", "run_2", wait=0, gone=never)
        assert refused.value.details == {"run_id": "run_1"} and int(refused.value.headers["Retry-After"]) >= 1

    def test_a_retry_whose_caller_left_stops_waiting_at_once(self):
        controls = controls_over(MemoryStore())
        _, retry = first_and_retry(controls)
        with pytest.raises(Conflict):  # a 60 s wait would run into the test's timeout instead
            controls.join(retry, "fp", "run_2", wait=60, gone=lambda: "the caller went away")

    def test_a_retry_is_pointed_at_the_first_run_once_it_is_handed_over(self):
        controls = controls_over(MemoryStore())
        first, retry = first_and_retry(controls)
        controls.bind(first, "run_1")
        joined = controls.join(retry, "fp", "run_2", wait=5, gone=never)
        assert joined.bound == "run_1" and not joined.new

    def test_a_retry_runs_itself_when_the_first_answer_is_not_remembered(self):
        controls = controls_over(MemoryStore())
        first, retry = first_and_retry(controls)
        controls.forget(first, "run_1")
        joined = controls.join(retry, "fp", "run_2", wait=5, gone=never)
        assert joined.new and joined.scope == retry.scope
        # The key is the retry's now: a further retry waits for run_2, and run_2's answer is remembered.
        assert controls.claim("acct-a", "k", "fp", "run_3").holder == "run_2"
        controls.bind(joined, "run_2")
        assert controls.claim("acct-a", "k", "fp", "run_3").bound == "run_2"


class Clock:
    def __init__(self, now=100.0):
        self.now = now

    def __call__(self):
        return self.now


class TestLeases:
    """A live run renews what it holds (CONTRACT §7: only a dead process's slots and keys free themselves)."""

    def test_a_live_runs_key_outlasts_its_first_lease(self):
        clock = Clock()
        store = MemoryStore(clock=clock)
        controls = controls_over(store)
        key = controls.claim("acct-a", "k", "fp", "run_1")
        clock.now += LEASE_SECONDS - 1
        controls.renew()
        clock.now += LEASE_SECONDS - 1  # past the first lease, within the renewed one
        assert store.read_key(key.scope).run_id == "run_1"

    def test_a_live_runs_slot_outlasts_its_first_lease(self):
        clock = Clock()
        store = MemoryStore(clock=clock)
        controls = RunControls(store, max_runs_per_account=1, run_capacity=4, idempotency_ttl=60)
        controls.take_slot("acct-a", "run_1")
        clock.now += LEASE_SECONDS - 1
        controls.renew()
        clock.now += LEASE_SECONDS - 1
        assert store.acquire_slot("acct-a", "run_2", 1, LEASE_SECONDS) == (False, 1)
        controls.release_slot("acct-a", "run_1")
        assert store.acquire_slot("acct-a", "run_2", 1, LEASE_SECONDS) == (True, 1)

    def test_a_retry_that_runs_itself_renews_the_key_it_reclaimed(self):
        clock = Clock()
        store = MemoryStore(clock=clock)
        controls = controls_over(store)
        first, retry = first_and_retry(controls)
        controls.forget(first, "run_1")
        joined = controls.join(retry, "fp", "run_2", wait=5, gone=never)
        clock.now += LEASE_SECONDS - 1
        controls.renew()
        clock.now += LEASE_SECONDS - 1
        assert joined.new and store.read_key(joined.scope).run_id == "run_2"

    def test_nothing_is_renewed_once_every_answer_is_given(self):
        renewed = []

        class Recording(MemoryStore):
            def renew(self, slots, keys, lease):
                renewed.append((list(slots), list(keys)))
                super().renew(slots, keys, lease)

        controls = RunControls(Recording(), max_runs_per_account=2, run_capacity=4, idempotency_ttl=60)
        bound = controls.claim("acct-a", "k1", "fp", "run_1")
        forgotten = controls.claim("acct-a", "k2", "fp", "run_2")
        controls.take_slot("acct-a", "run_1")
        controls.renew()
        assert sorted(run for _, run in renewed[-1][1]) == ["run_1", "run_2"] and len(renewed[-1][0]) == 1
        controls.release_slot("acct-a", "run_1")
        controls.bind(bound, "run_1")
        controls.forget(forgotten, "run_2")
        count = len(renewed)
        controls.renew()
        assert len(renewed) == count


class TestRenewalThread:
    """The run records' keeper renews the slots and keys too, every RENEW_SECONDS, until stop() ends it."""

    class Recording(MemoryStore):
        def __init__(self):
            super().__init__()
            self.renewals = 0

        def renew(self, slots, keys, lease):
            self.renewals += 1
            super().renew(slots, keys, lease)

    @pytest.fixture(autouse=True)
    def quick(self, monkeypatch):
        monkeypatch.setattr("bus_containers_provider.records.RENEW_SECONDS", 0.01)
        monkeypatch.setattr("bus_containers_provider.records.TICK", 0.01)

    def renewing(self, store):
        before = store.renewals
        wait_until(lambda: store.renewals >= before + 3, what="three renewals by the thread")

    def keeper(self, store):
        from bus_containers_provider.backends.static import StaticBackend
        from bus_containers_provider.config import Settings
        from bus_containers_provider.records import RunRecords
        from bus_containers_provider.usage import NoUsage

        controls = RunControls(store, max_runs_per_account=1, run_capacity=4, idempotency_ttl=60)
        return controls, RunRecords(store, StaticBackend(), NoUsage(), controls, Settings(jwt_secret=b"x" * 32))

    def test_a_held_slot_is_renewed_by_the_records_keeper_until_stop(self):
        store = self.Recording()
        controls, records = self.keeper(store)
        controls.take_slot("acct-a", "run_1")
        records.start()
        started = records._thread
        self.renewing(store)
        records.stop(hand_over=False)
        assert not started.is_alive()  # joined, so nothing renews any more
        count = store.renewals
        controls.renew()  # by hand it still works: the count moves only for that
        assert store.renewals == count + 1

    def test_start_after_stop_renews_again(self):
        store = self.Recording()
        controls, records = self.keeper(store)
        controls.take_slot("acct-a", "run_1")
        records.start()
        records.stop(hand_over=False)
        records.start()
        self.renewing(store)
        records.stop(hand_over=False)


class Interleaved(MemoryStore):
    """The first record vanishes, and another request claims the key between a retry's read and its claim."""

    def __init__(self):
        super().__init__()
        self.meanwhile = None

    def read_key(self, scope):
        if self.meanwhile is None:
            return super().read_key(scope)
        meanwhile, self.meanwhile = self.meanwhile, None
        meanwhile(self, scope)
        return None


class TestReclaimRace:
    def test_another_body_that_took_the_key_first_makes_the_retry_a_422(self):
        store = Interleaved()
        controls = controls_over(store)
        _, retry = first_and_retry(controls)
        store.meanwhile = lambda s, scope: (s._keys.clear(), s.claim_key(scope, "other-body", "run_3", 30))
        with pytest.raises(IdempotencyKeyReused):
            controls.join(retry, "fp", "run_2", wait=5, gone=never)

    def test_a_run_that_took_the_key_and_was_handed_over_first_answers_the_retry(self):
        store = Interleaved()
        controls = controls_over(store)
        _, retry = first_and_retry(controls)

        def meanwhile(s, scope):
            s._keys.clear()
            s.claim_key(scope, "fp", "run_3", 30)
            s.bind_key(scope, "run_3", 60)

        store.meanwhile = meanwhile
        assert controls.join(retry, "fp", "run_2", wait=5, gone=never).bound == "run_3"

    def test_a_run_that_took_the_key_first_is_waited_for_never_run_again(self):
        store = Interleaved()
        controls = controls_over(store)
        _, retry = first_and_retry(controls)
        store.meanwhile = lambda s, scope: (s._keys.clear(), s.claim_key(scope, "fp", "run_3", 30))
        # run_3 holds the key and never answers: the retry waits for it, then is refused naming it.
        with pytest.raises(Conflict) as refused:
            controls.join(retry, "fp", "run_2", wait=0.3, gone=never)
        assert refused.value.details == {"run_id": "run_3"}


def test_readiness_names_the_store_while_it_is_down(redis_server):
    controls = controls_over(RedisStore(redis_server.url))
    try:
        assert controls.down() is False
        redis_server.stop()
        assert controls.down() is True
        redis_server.start()
        assert controls.down() is False
    finally:
        controls.stop()


class TestCallerGone:
    """A caller whose connection closed is noticed; bytes of a pipelined request are not a close."""

    @pytest.fixture
    def connection(self):
        with socket.create_server(("127.0.0.1", 0)) as server:
            caller = socket.create_connection(server.getsockname(), timeout=5)
            accepted, _ = server.accept()
            yield caller, accepted
            caller.close()
            accepted.close()

    def test_without_a_socket_nobody_is_gone(self):
        assert caller_gone({})() is None

    def test_an_open_idle_connection_is_not_gone(self, connection):
        _, accepted = connection
        assert caller_gone({"gunicorn.socket": accepted})() is None

    def test_a_pipelined_request_is_not_a_close_and_stays_unread(self, connection):
        caller, accepted = connection
        caller.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
        gone = caller_gone({"gunicorn.socket": accepted})
        wait_until(lambda: select.select([accepted], [], [], 0)[0], what="the request bytes")
        assert gone() is None
        assert accepted.recv(100) == b"GET /healthz HTTP/1.1\r\n\r\n"

    @pytest.mark.parametrize("leave", ["close", "shutdown"])
    def test_a_caller_that_closed_is_gone(self, connection, leave):
        caller, accepted = connection
        gone = caller_gone({"gunicorn.socket": accepted})
        if leave == "close":
            caller.close()
        else:
            caller.shutdown(socket.SHUT_WR)
        wait_until(lambda: gone() == "the caller went away", what="the close noticed")

    def test_a_socket_already_closed_here_is_gone(self, connection):
        _, accepted = connection
        gone = caller_gone({"gunicorn.socket": accepted})
        accepted.close()
        assert gone() == "the caller went away"


class TestCallerLeaves:
    @pytest.fixture
    def app_env(self, events_server, responder):
        return events_env(events_server)

    def test_a_caller_that_leaves_cancels_its_run_by_name(self, app, events_server):
        """In process, with the socket gunicorn would put in the environ: the close is noticed and the run cancelled."""
        client = connected(app).test_client()
        body = {"profile": "never", "args": ["x"], "timeout_seconds": 20}
        with socket.create_server(("127.0.0.1", 0)) as server, \
                concurrent.futures.ThreadPoolExecutor(1) as pool:
            caller = socket.create_connection(server.getsockname(), timeout=5)
            accepted, _ = server.accept()
            with caller, accepted:
                pending = pool.submit(client.post, RUNS, json=body, headers=bearer("acct-a"),
                                      environ_base={"gunicorn.socket": accepted})
                [request] = events_server.wait_published(RUN_NAME, 1, timeout=5)
                caller.close()
                [cancel] = events_server.wait_published("bus.containers.delete.request", 1, timeout=10)
                pending.result(timeout=15)
        assert cancel["payload"] == {"run_id": request["payload"]["run_id"], "owner_account_id": "acct-a"}
        assert app.extensions["bus_containers"].bus.registry.pending() == 0


# Each refusal counts under its own reason (README, "Metrics": bus_containers_run_rejections_total).

def rejections(counted):
    return Changes(counted, "bus_containers_run_rejections_total", "reason",
                   ["too_many_runs", "conflict", "idempotency_key_reused", "capacity", "other"])


class TestRejectionsCounted:
    def test_a_key_reused_with_another_body(self, counted):
        controls = controls_over(MemoryStore())
        controls.claim("acct-a", "k", "fp", "run_1")
        with rejections(counted) as changes, pytest.raises(IdempotencyKeyReused):
            controls.claim("acct-a", "k", "other-body", "run_2")
        assert changes.delta == {"idempotency_key_reused": 1}

    def test_a_retry_that_finds_the_key_taken_by_another_body(self, counted):
        store = Interleaved()
        controls = controls_over(store)
        _, retry = first_and_retry(controls)
        store.meanwhile = lambda s, scope: (s._keys.clear(), s.claim_key(scope, "other-body", "run_3", 30))
        with rejections(counted) as changes, pytest.raises(IdempotencyKeyReused):
            controls.join(retry, "fp", "run_2", wait=5, gone=never)
        assert changes.delta == {"idempotency_key_reused": 1}

    def test_a_retry_that_cannot_wait(self, counted):
        controls = controls_over(MemoryStore())
        _, retry = first_and_retry(controls)
        with rejections(counted) as changes, pytest.raises(Conflict):
            controls.join(retry, "fp", "run_2", wait=0, gone=never)
        assert changes.delta == {"conflict": 1}

    def test_a_full_account(self, counted):
        controls = RunControls(MemoryStore(), max_runs_per_account=1, run_capacity=4, idempotency_ttl=60)
        controls.take_slot("acct-a", "run_1")
        with rejections(counted) as changes, pytest.raises(TooManyRuns):
            controls.take_slot("acct-a", "run_2")
        assert changes.delta == {"too_many_runs": 1}

    @pytest.mark.parametrize("refusal,reason", [(None, "capacity"), (Conflict(), "conflict")])
    def test_a_full_capacity_as_capacity_or_as_the_retrys_conflict(self, counted, refusal, reason):
        capacity = Capacity(1)
        with capacity.hold():
            with rejections(counted) as changes, pytest.raises(Unavailable if refusal is None else Conflict):
                with capacity.hold(refusal):
                    pass
        assert changes.delta == {reason: 1}


class FakeTime:
    """time.monotonic and time.sleep for the controls module: sleeping moves the clock, and nothing else does."""

    def __init__(self):
        self.now = 0.0

    def monotonic(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


@pytest.mark.parametrize("wait", [0.3, 2.0, 5.0])
def test_a_joined_retry_gives_up_within_its_own_wait_never_after(monkeypatch, wait):
    """§7: a retry of a run in flight waits for its answer bounded by its own run wait."""
    import bus_containers_provider.controls as controls_module

    clock = FakeTime()
    monkeypatch.setattr(controls_module, "time", clock)
    controls = controls_over(MemoryStore())
    _, retry = first_and_retry(controls)
    with pytest.raises(Conflict):
        controls.join(retry, "fp", "run_2", wait=wait, gone=never)
    assert 0 < clock.now <= wait
