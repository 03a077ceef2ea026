"""Detached runs (CONTRACT §9) through gunicorn over real sockets, against the test Events API and responder."""
import time

import pytest
import requests

from conftest import bearer
from test_run_controls_served import DELETE_NAME, RUN_NAME, RUNS, USAGE, served, wait_listening

pytestmark = pytest.mark.timeout(90)


def submit(url, body, prefer="respond-async", account="acct-a", key=None):
    headers = dict(bearer(account), Prefer=prefer)
    if key is not None:
        headers["Idempotency-Key"] = key
    return requests.post(f"{url}{RUNS}", json=body, headers=headers, timeout=30)


def read(url, run_id, account="acct-a", prefer=None, timeout=30):
    headers = dict(bearer(account), **({"Prefer": prefer} if prefer else {}))
    return requests.get(f"{url}{RUNS}/{run_id}", headers=headers, timeout=timeout)


def body(profile="sleep:0.5", tag="x"):
    return {"profile": profile, "args": ["echo", tag], "timeout_seconds": 30}


@pytest.fixture
def provider(events_server, responder):
    with served(events_server, "--workers", "1", "--usage-backend", "events", "--max-wait", "5s",
                BUS_CONTAINERS_SHUTDOWN_GRACE="1s") as process:
        wait_listening(events_server, 1)
        yield process


def usage_of(events_server, run_id):
    return [e["payload"] for e in events_server.published(USAGE) if e["payload"]["data"]["run_id"] == run_id]


def test_a_detached_run_is_accepted_at_once_and_collected_with_a_wait(provider, events_server):
    accepted = submit(provider.url, body("sleep:1", "detached"))
    assert accepted.status_code == 202, accepted.text
    shown = accepted.json()
    run_id = shown["id"]
    assert accepted.headers["Location"] == f"{RUNS}/{run_id}"
    assert accepted.headers["Preference-Applied"] == "respond-async"
    assert int(accepted.headers["Retry-After"]) >= 1
    assert shown["state"] == "running" and shown["owner_account_id"] == "acct-a" and "result" not in shown
    [published] = events_server.wait_published(RUN_NAME, 1, timeout=10)
    assert published["payload"]["run_id"] == run_id

    waited = read(provider.url, run_id, prefer="wait=30")
    assert waited.status_code == 200 and waited.headers["Preference-Applied"] == "wait=5"  # capped by --max-wait
    done = waited.json()
    assert done["state"] == "finished" and "Retry-After" not in waited.headers
    assert done["result"]["run_id"] == run_id and done["result"]["stdout"] == "echo detached"
    assert done["result"]["status"] == "succeeded"
    # The record is read as it is: nothing more is asked of the backend, nothing published twice.
    before = len(events_server.published())
    assert read(provider.url, run_id).json() == done
    # (the run's usage record may still be on its way meanwhile: that is not a question to the backend)
    assert [e for e in events_server.published()[before:] if e["name"].startswith("bus.containers.")] == []
    assert len(events_server.published(RUN_NAME)) == 1
    deadline = time.monotonic() + 10
    while not [u for u in usage_of(events_server, run_id) if u["event_type"] == "container_run_finished"]:
        assert time.monotonic() < deadline, "container_run_finished was not recorded"
        time.sleep(0.05)


def test_a_short_wait_answers_the_foreground_result_when_the_run_finishes_in_time(provider):
    answered = submit(provider.url, body("sleep:0.2", "quick"), prefer="respond-async, wait=5")
    assert answered.status_code == 200, answered.text
    assert answered.json()["stdout"] == "echo quick" and answered.headers["Preference-Applied"] == "wait=5"


def test_a_wait_that_runs_out_answers_the_202(provider):
    accepted = submit(provider.url, body("never"), prefer="respond-async, wait=1")
    assert accepted.status_code == 202
    assert accepted.headers["Preference-Applied"] == "respond-async, wait=1"
    running = read(provider.url, accepted.json()["id"])
    assert running.json()["state"] == "running" and int(running.headers["Retry-After"]) >= 1


def test_another_accounts_run_is_not_found_at_once_even_with_a_wait(provider):
    run_id = submit(provider.url, body("never")).json()["id"]
    # A 30 s wait on someone else's run would outlast this 5 s timeout: it is answered at once.
    refused = read(provider.url, run_id, account="acct-b", prefer="wait=30", timeout=5)
    assert refused.status_code == 404 and refused.json()["error"]["type"] == "not_found"
    deleted = requests.delete(f"{provider.url}{RUNS}/{run_id}", headers=bearer("acct-b"), timeout=5)
    assert deleted.status_code == 404
    assert run_id not in {item["id"] for item in requests.get(
        f"{provider.url}{RUNS}", headers=bearer("acct-b"), timeout=5).json()["items"]}


def test_deleting_a_running_run_cancels_it_and_forgets_it(provider, events_server):
    run_id = submit(provider.url, body("never")).json()["id"]
    deleted = requests.delete(f"{provider.url}{RUNS}/{run_id}", headers=bearer(), timeout=10)
    assert deleted.status_code == 200
    assert deleted.json() == {"deleted": True, "run_id": run_id, "owner_account_id": "acct-a"}
    [cancel] = events_server.wait_published(DELETE_NAME, 1, timeout=10)
    assert cancel["payload"] == {"run_id": run_id, "owner_account_id": "acct-a"}
    assert read(provider.url, run_id).status_code == 404
    deadline = time.monotonic() + 10
    while not (failed := [u for u in usage_of(events_server, run_id) if u["event_type"] == "container_run_failed"]):
        assert time.monotonic() < deadline, "container_run_failed was not recorded"
        time.sleep(0.05)
    assert failed[0]["data"]["reason"] == "cancelled"


def test_the_list_shows_records_newest_first(provider):
    first = submit(provider.url, body("never", "first")).json()["id"]
    second = submit(provider.url, body("sleep:0", "second"), prefer="respond-async, wait=5").json()["run_id"]
    items = requests.get(f"{provider.url}{RUNS}", headers=bearer(), timeout=10).json()["items"]
    ids = [item["id"] for item in items]
    assert ids.index(second) < ids.index(first)
    assert {item["id"]: item["state"] for item in items if item["id"] in (first, second)} == {
        first: "running", second: "finished"}


def test_a_retried_detached_submission_is_the_same_run(provider, events_server):
    first = submit(provider.url, body("never", "keyed"), key="detached-key")
    again = submit(provider.url, body("never", "keyed"), key="detached-key")
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"] and again.headers["Location"] == first.headers["Location"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert len(events_server.published(RUN_NAME)) == 1


@pytest.mark.parametrize("prefer", ["respond-async=yes", "wait", "handling=lenient", ";;,,", "wait=-1"])
def test_unknown_or_malformed_preferences_are_ignored(provider, prefer):
    answered = submit(provider.url, body("sleep:0", "plain"), prefer=prefer)
    assert answered.status_code == 200, answered.text
    assert answered.json()["stdout"] == "echo plain" and "Preference-Applied" not in answered.headers


def test_without_a_shared_store_a_detached_run_outlasting_the_shutdown_grace_is_cancelled(events_server, responder):
    with served(events_server, "--workers", "1", "--usage-backend", "events",
                BUS_CONTAINERS_SHUTDOWN_GRACE="1s") as process:
        wait_listening(events_server, 1)
        run_id = submit(process.url, body("never")).json()["id"]
        events_server.wait_published(RUN_NAME, 1, timeout=10)
    # Stopped (SIGTERM, then the grace): nobody else could have finished it, so it was cancelled.
    [cancel] = events_server.wait_published(DELETE_NAME, 1, timeout=10)
    assert cancel["payload"] == {"run_id": run_id, "owner_account_id": "acct-a"}
    failed = [u for u in usage_of(events_server, run_id) if u["event_type"] == "container_run_failed"]
    assert [u["data"]["reason"] for u in failed] == ["cancelled"]
