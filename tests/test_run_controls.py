"""Run controls (CONTRACT §7) through the app: Idempotency-Key, account slots, run capacity."""
import concurrent.futures
import threading

import pytest

from conftest import bearer, connected, env, events_env

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

    @pytest.mark.parametrize("header", ["", " ", "a b", "é", "x" * 256, '"bad\\escape"',
                                        '"inner"quote"', "tab\there"])
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
    def app_env(self, events_server):
        return events_env(events_server, BUS_CONTAINERS_USAGE_BACKEND="events",
                          BUS_CONTAINERS_BILLING_BACKEND="events", BUS_CONTAINERS_RUN_TIMEOUT_GRACE="1s")

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
    def app_env(self, events_server):
        return events_env(events_server, BUS_CONTAINERS_MAX_RUNS_PER_ACCOUNT="2",
                          BUS_CONTAINERS_USAGE_BACKEND="events", BUS_CONTAINERS_BILLING_BACKEND="events")

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
                with pytest.raises(RunCancelled):
                    waiting.result(timeout=10)
        events_server.reset_faults()
        failed = [r for r in provider.usage.records if r["event_type"] == "container_run_failed"]
        assert [(r["data"]["run_id"], r["data"]["reason"]) for r in failed] == [("run_gone", "cancelled")]
        assert all(e["name"] != "bus.containers.delete.request" for e in events_server.published())
