"""Exactly once across a death (CONTRACT §9; issue 20, point 3): a run outlives the process that published it.

Two real provider processes (the console script, one gunicorn worker each, events backend and
usage, listener retry on) share one redis-server and one Events API; the integration worker is
the test Responder. A run's reply is held by the responder (profile ``hold:NAME``) until the test
releases it, so the process serving the run can be SIGKILLed - no cleanup, no lease given back -
while the run is certainly in flight:

(a) a foreground run with an Idempotency-Key loses its worker; the retry, sent to the other
    provider, answers the original run's result once the reply comes: one run request published
    in all, one ``container_run_finished``;
(b) a detached run loses its whole provider; the other provider adopts the record within 60 s
    and finishes it with the reply - one published while nobody waited for it, or one that comes
    after the adoption - without publishing the run again; a provider stopped with SIGTERM
    hands its record over instead of waiting for it;
(c) a run whose reply never comes finishes at its deadline with the 503 answer,
    ``container_run_failed`` ``reason: unavailable``, and its account slot free - with its
    publisher alive (foreground and detached) or killed; and a run that any process reads as
    finished has freed its slot already, so the account's next run is never a 429.

Every wait is a bounded poll for the fact itself.
"""
import contextlib
import os
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
import requests

import processes
from conftest import bearer, events_env

RUNS = "/api/v1/containers/runs"
RUN = "bus.containers.run.request"
REQUESTED, FINISHED, FAILED = "container_run_requested", "container_run_finished", "container_run_failed"
ADOPTION = 60.0  # CONTRACT §9: another process adopts a dead process's record within 60 s of the death
SLACK = 15.0  # on top of a contract bound, for a loaded machine: an answer, a usage record, a scheduler
HELD_RUN_TIMEOUT = 120  # timeout_seconds of a held run: its deadline lies far beyond any adoption
WAIT = 5  # Prefer: wait=N of the polling reads
ROUNDS = 500  # runs read as finished on the other process, each followed at once by the next

pytestmark = [pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds gunicorn workers in /proc"),
              pytest.mark.timeout(ADOPTION + 3 * SLACK + 120)]


class Call:
    """One HTTP request on its own thread: its response, or the exception that ended it."""

    def __init__(self, method, url, **kwargs):
        self.response = self.error = None
        self._thread = threading.Thread(target=self._run, args=(method, url), kwargs=kwargs, daemon=True)
        self._thread.start()

    def _run(self, method, url, **kwargs):
        try:
            self.response = requests.request(method, url, **kwargs)
        except requests.RequestException as exc:
            self.error = exc

    def done(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def __repr__(self):
        if self.response is not None:
            return f"<answered {self.response.status_code}: {self.response.text[:300]}>"
        return f"<{'failed: %r' % self.error if self.error else 'waiting'}>"


def wait_for(predicate, timeout: float, what: str):
    """The first truthy value of `predicate()`, polled until `timeout` s have passed."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.05)


def gone(pid: int) -> bool:
    """True once `pid` has exited (reaped, or a zombie nobody reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


@pytest.fixture
def providers(events_server, responder, redis_server):
    """start(*flags, **variables): two providers on one Events API and one Redis, each ready; logs at teardown."""
    started = []

    with contextlib.ExitStack() as stack:
        def start(*extra, **variables):
            env = processes.provider_env(**events_env(events_server, **{
                "BUS_EVENTS_LISTENER_REQUIRED": "1", "BUS_CONTAINERS_MAX_RUN_TIMEOUT": "600s",
                "BUS_CONTAINERS_SHUTDOWN_GRACE": "10s", **variables}))
            flags = ("--backend", "events", "--events-url", events_server.url, "--usage-backend", "events",
                     "--state-url", redis_server.url, "--workers", "1", *extra)
            for _ in range(2):
                started.append(stack.enter_context(processes.console_script(*flags, env=env)))
            for provider in started:
                wait_for(lambda: _ready(provider), 20, f"{provider.url} ready (listeners and store)")
            return started

        try:
            yield start
        finally:
            for number, provider in enumerate(started, 1):
                print(f"--- provider {number} ({provider.url}) ---\n{provider.log()[-6000:]}")


def _ready(provider) -> bool:
    with contextlib.suppress(requests.RequestException):
        return requests.get(f"{provider.url}/readyz", timeout=2).status_code == 200
    return False


def kill_worker(provider) -> int:
    """SIGKILL the provider's one gunicorn worker, the process serving its requests; returns its pid."""
    [worker] = wait_for(lambda: (kids := processes.children(provider.pid)) and len(kids) == 1 and kids, 10,
                        f"one worker under {provider.pid}")
    os.kill(worker, signal.SIGKILL)
    wait_for(lambda: gone(worker), 10, f"worker {worker} gone")
    return worker


def kill_provider(provider) -> None:
    """SIGKILL the master and its worker at once (the process group): nothing of it is left to clean up."""
    workers = processes.children(provider.pid)
    assert workers, f"no worker under {provider.pid}"
    os.killpg(provider.pid, signal.SIGKILL)
    provider.wait(10)
    wait_for(lambda: all(gone(pid) for pid in workers), 10, f"workers {workers} gone")


def runs_published(events_server, nonce: str) -> list:
    """Run requests published for the run whose command carries `nonce`."""
    return [e for e in events_server.published(RUN) if nonce in (e["payload"].get("command") or [])]


def usage(responder, event_type: str, run_id: str) -> list:
    return [r for r in list(responder.usage_records)
            if r.get("event_type") == event_type and (r.get("data") or {}).get("run_id") == run_id]


def read(provider, run_id: str, account: str, wait: int = 0):
    headers = dict(bearer(account), **({"Prefer": f"wait={wait}"} if wait else {}))
    return requests.get(f"{provider.url}{RUNS}/{run_id}", headers=headers, timeout=wait + 15)


def finished(provider, run_id: str, account: str, within: float) -> dict:
    """The run's item once its state is `finished`, read with Prefer: wait, for up to `within` s."""
    def item():
        response = read(provider, run_id, account, wait=WAIT)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["id"] == run_id and body["owner_account_id"] == account, body
        assert body["state"] in ("running", "finished"), body
        return body if body["state"] == "finished" else None

    return wait_for(item, within, f"run {run_id} finished")


def submit_detached(provider, body: dict, account: str) -> str:
    """POST with Prefer: respond-async; the 202's run id."""
    response = requests.post(provider.url + RUNS, json=body, timeout=15,
                             headers=dict(bearer(account), Prefer="respond-async"))
    assert response.status_code == 202, response.text
    item = response.json()
    assert item["state"] == "running" and item["owner_account_id"] == account, item
    assert response.headers["Location"].endswith(f"{RUNS}/{item['id']}"), response.headers
    return item["id"]


def assert_one_run(events_server, nonce: str, run_id: str) -> None:
    published = runs_published(events_server, nonce)
    assert [e["payload"]["run_id"] for e in published] == [run_id], published


def assert_recorded_once(responder, event_type: str, run_id: str) -> None:
    """After the providers stopped (SIGTERM flushes pending records): one record, as one event_id."""
    records = usage(responder, event_type, run_id)
    assert len({r["event_id"] for r in records}) == 1, records
    other = FAILED if event_type == FINISHED else FINISHED
    assert usage(responder, other, run_id) == [], usage(responder, other, run_id)


def test_a_retry_after_its_worker_died_answers_the_first_run_and_nothing_runs_twice(
        providers, events_server, responder):
    first, second = providers()
    account, nonce = "acct-adopt-a", uuid.uuid4().hex
    hold = f"a-{nonce[:12]}"
    body = {"profile": f"hold:{hold}", "args": ["echo", nonce], "timeout_seconds": HELD_RUN_TIMEOUT}
    headers = dict(bearer(account), **{"Idempotency-Key": f"key-{nonce}"})

    call = Call("POST", first.url + RUNS, json=body, headers=headers, timeout=HELD_RUN_TIMEOUT + 30)
    wait_for(lambda: responder.held(hold) == 1, 15, "the run request at the worker, its reply held")
    [published] = runs_published(events_server, nonce)
    run_id = published["payload"]["run_id"]

    kill_worker(first)
    assert call.done(15), "the caller of the killed worker is still waiting"
    assert call.response is None, call

    retry = Call("POST", second.url + RUNS, json=body, headers=headers, timeout=ADOPTION + 2 * SLACK)
    # No answer exists before the reply does, and the retry's own run wait is minutes: it waits.
    assert not retry.done(2), f"the retry answered before the run's reply existed: {retry}"
    assert responder.release(hold) == 1
    assert retry.done(ADOPTION + 2 * SLACK + 5), f"the retry had no answer: {retry}"
    assert retry.response is not None, retry
    assert retry.response.status_code == 200, retry.response.text
    result = retry.response.json()
    assert result["run_id"] == run_id and result["owner_account_id"] == account, result
    assert (result["stdout"], result["exit_code"], result["status"]) == (f"echo {nonce}", 0, "succeeded"), result

    # Both processes read the same finished record, with the answer the retry had.
    for provider in (second, first):
        response = read(provider, run_id, account)
        assert response.status_code == 200, response.text
        item = response.json()
        assert item["state"] == "finished" and item["result"] == result, item

    # Retried once more, now that it finished: the same answer again, remembered (§7).
    again = requests.post(first.url + RUNS, json=body, headers=headers, timeout=30)
    assert again.status_code == 200 and again.json() == result, again.text
    assert again.headers.get("Idempotent-Replayed") == "true", again.headers

    wait_for(lambda: usage(responder, FINISHED, run_id), 30, "container_run_finished recorded")
    processes.stop(first)
    processes.stop(second)
    assert_one_run(events_server, nonce, run_id)
    assert_recorded_once(responder, FINISHED, run_id)
    requested = [r for r in list(responder.usage_records)
                 if r.get("event_type") == REQUESTED and r["data"].get("profile") == body["profile"]]
    assert {r["data"]["run_id"] for r in requested} == {run_id}, requested


@pytest.mark.parametrize("reply", ["before adoption", "after adoption"])
def test_b_a_detached_run_whose_provider_died_is_adopted_and_finished_by_the_other(
        providers, events_server, responder, reply):
    first, second = providers()
    account, nonce = f"acct-adopt-b-{reply.replace(' ', '-')}", uuid.uuid4().hex
    hold = f"b-{nonce[:12]}"
    body = {"profile": f"hold:{hold}", "args": ["echo", nonce], "timeout_seconds": HELD_RUN_TIMEOUT}

    run_id = submit_detached(first, body, account)
    wait_for(lambda: responder.held(hold) == 1, 15, "the run request at the worker, its reply held")
    assert_one_run(events_server, nonce, run_id)

    kill_provider(first)
    killed_at = time.monotonic()
    # The record lives in the shared store: the other process reads it, still running.
    response = read(second, run_id, account)
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "running", response.json()
    assert int(response.headers["Retry-After"]) >= 1, response.headers

    if reply == "after adoption":
        # Adopted by the contract's bound at the latest; the provider's log line says so sooner.
        wait_for(lambda: f"adopting run {run_id}" in second.log() or time.monotonic() >= killed_at + ADOPTION,
                 ADOPTION + 1, "the record adopted")
        # The adopter waits on its live reply stream: the reply arrives there.
    # Before adoption the reply is published while no process waits for it: the adopter finds it stored.
    assert responder.release(hold) == 1
    item = finished(second, run_id, account, within=killed_at + ADOPTION + SLACK - time.monotonic())
    result = item["result"]
    assert "error" not in item, item
    assert result["run_id"] == run_id and result["owner_account_id"] == account, result
    assert (result["stdout"], result["exit_code"], result["status"]) == (f"echo {nonce}", 0, "succeeded"), result
    assert result["stdout_truncated"] is False and result["stderr_truncated"] is False, result

    wait_for(lambda: usage(responder, FINISHED, run_id), 30, "container_run_finished recorded")
    processes.stop(second)
    assert_one_run(events_server, nonce, run_id)
    assert_recorded_once(responder, FINISHED, run_id)


def test_b_a_detached_run_whose_provider_stops_with_sigterm_is_handed_over_not_waited_for(
        providers, events_server, responder):
    # A shutdown grace far longer than the provider may take to stop: waiting out the run would show.
    first, second = providers(BUS_CONTAINERS_SHUTDOWN_GRACE="90s")
    account, nonce = "acct-adopt-b-sigterm", uuid.uuid4().hex
    hold = f"t-{nonce[:12]}"
    body = {"profile": f"hold:{hold}", "args": ["echo", nonce], "timeout_seconds": HELD_RUN_TIMEOUT}

    run_id = submit_detached(first, body, account)
    wait_for(lambda: responder.held(hold) == 1, 15, "the run request at the worker, its reply held")
    os.killpg(first.pid, signal.SIGTERM)
    stopped_at = time.monotonic()
    # With a shared store the record is left for another process (§9): the provider does not wait for it.
    try:
        first.wait(30)
    except subprocess.TimeoutExpired:
        raise AssertionError("the provider waited for its detached run instead of leaving it") from None
    assert first.returncode == 0, first.returncode

    assert responder.release(hold) == 1
    item = finished(second, run_id, account, within=stopped_at + ADOPTION + SLACK - time.monotonic())
    result = item["result"]
    assert result["run_id"] == run_id and result["stdout"] == f"echo {nonce}", item

    wait_for(lambda: usage(responder, FINISHED, run_id), 30, "container_run_finished recorded")
    processes.stop(second)
    assert_one_run(events_server, nonce, run_id)
    assert_recorded_once(responder, FINISHED, run_id)


@pytest.mark.parametrize("how", ["foreground", "detached", "publisher killed"])
def test_c_a_run_whose_reply_never_comes_finishes_at_its_deadline_with_the_503_answer(
        providers, events_server, responder, how):
    first, second = providers("--run-timeout-grace", "1s", "--max-runs-per-account", "1")
    account, nonce = f"acct-adopt-c-{how.replace(' ', '-')}", uuid.uuid4().hex
    # A publisher to be killed gets a deadline it cannot reach first: the kill follows the 202 at once.
    timeout_seconds = 10 if how == "publisher killed" else 1
    body = {"profile": "never", "args": ["echo", nonce], "timeout_seconds": timeout_seconds}
    deadline = timeout_seconds + 1  # + --run-timeout-grace

    started = time.monotonic()
    if how == "foreground":
        response = requests.post(first.url + RUNS, json=body, headers=bearer(account), timeout=30)
        waited = time.monotonic() - started
        assert response.status_code == 503, response.text
        assert int(response.headers["Retry-After"]) >= 1, response.headers
        error = response.json()["error"]
        assert error["type"] == "unavailable", error
        run_id = error["details"]["run_id"]
        assert waited >= deadline, f"answered after {waited:.2f} s, before the run's deadline"
        within = SLACK
    else:
        run_id = submit_detached(first, body, account)
        within = deadline + SLACK
        if how == "publisher killed":
            kill_provider(first)
            response = read(second, run_id, account)
            assert response.status_code == 200 and response.json()["state"] == "running", response.text
            within = ADOPTION + SLACK
    assert_one_run(events_server, nonce, run_id)

    item = finished(second, run_id, account, within=within)
    assert "result" not in item, item
    assert item["error"]["type"] == "unavailable", item
    if how == "foreground":
        assert item["error"] == error, item
    # Its account slot is free once it finished: the next run of the account (limit 1) is served.
    following = requests.post(second.url + RUNS, json={"profile": "p", "args": ["echo", "next"]},
                              headers=bearer(account), timeout=30)
    assert following.status_code == 200, following.text

    failed = wait_for(lambda: usage(responder, FAILED, run_id), 30, "container_run_failed recorded")
    assert failed[0]["data"]["reason"] == "unavailable", failed
    for provider in (first, second):
        processes.stop(provider)
    assert_one_run(events_server, nonce, run_id)
    assert_recorded_once(responder, FAILED, run_id)


def test_a_run_read_as_finished_on_the_other_process_has_freed_its_account_slot(providers):
    """Completing a run frees its slot (§9): whoever is told it finished may start the next run at once.

    Each round's run is submitted to one process and read as finished on the other, with
    Prefer: wait; the account's next run (limit 1) follows at once. A slot freed only after the
    record reads as finished refuses some of those runs with a 429: about one round in a hundred
    here, so 500 rounds (some 20 s) catch it nearly always, and a correct provider never fails.
    """
    first, second = providers("--max-runs-per-account", "1")
    account = "acct-adopt-slot"
    refused = []
    for number in range(ROUNDS):
        publisher, reader = (first, second) if number % 2 == 0 else (second, first)
        run_id = submit_detached(publisher, {"profile": "p", "args": ["echo", str(number)]}, account)
        finished(reader, run_id, account, within=SLACK)
        following = requests.post(reader.url + RUNS, json={"profile": "p", "args": ["echo", "next"]},
                                  headers=bearer(account), timeout=30)
        if following.status_code == 429:
            refused.append(run_id)
            # Not this round's fault any more: the slot frees itself an instant later.
            wait_for(lambda: requests.post(reader.url + RUNS, json={"profile": "p", "args": ["echo", "again"]},
                                           headers=bearer(account), timeout=30).status_code == 200,
                     SLACK, "the account's slot free again")
        else:
            assert following.status_code == 200, following.text
    assert not refused, f"{len(refused)} of {ROUNDS} runs read as finished still held their slot: {refused}"
