"""The events backend under concurrency: real gunicorn workers, real sockets, a real Events API."""
import concurrent.futures
import random
import re
import threading
import time
import uuid

import pytest
import requests

from conftest import EVENTS_TOKEN, bearer, connected, events_env
from processes import console_script, provider_env

# Every test here waits on a provider, a stream or a server: a lost reply fails it at this bound.
pytestmark = pytest.mark.timeout(90)

RUNS = "/api/v1/containers/runs"
REPLY_NAMES = [f"bus.containers.{name}.response"
               for name in ("status", "run", "delete", "runner.status", "runner.start", "runner.delete")]
ACCOUNTS = [f"acct-{n}" for n in range(5)]


def wait_streams(server, per_name, timeout=15.0):
    deadline = time.monotonic() + timeout
    while any(server.open_streams(name) != per_name for name in REPLY_NAMES):
        assert time.monotonic() < deadline, {name: server.open_streams(name) for name in REPLY_NAMES}
        time.sleep(0.05)


@pytest.fixture
def provider(events_server, responder):
    variables = {k: v for k, v in events_env(events_server).items()
                 if k.startswith("BUS_EVENTS_LISTENER") or k == "BUS_CONTAINERS_MAX_RUN_TIMEOUT"}
    env = provider_env(BUS_API_TOKEN=EVENTS_TOKEN, BUS_CONTAINERS_RUN_TIMEOUT_GRACE="2s", **variables)
    with console_script("--backend", "events", "--events-url", events_server.url,
                        "--workers", "2", "--threads", "128", "--max-runs-per-account", "0",
                        env=env) as process:
        wait_streams(events_server, per_name=2)
        yield process


def post_run(url, account, profile, timeout_seconds=10):
    nonce = uuid.uuid4().hex
    started = time.monotonic()
    response = requests.post(f"{url}{RUNS}", headers=bearer(account), timeout=60, json={
        "profile": profile, "args": ["echo", account, nonce], "timeout_seconds": timeout_seconds})
    return account, nonce, response, time.monotonic() - started


def test_one_stream_per_reply_name_per_worker(provider, events_server):
    for name in REPLY_NAMES:
        assert events_server.open_streams(name) == 2
        assert events_server.streams_opened(name) == 2


def test_concurrent_runs_never_cross_replies(provider, events_server):
    rng = random.Random(7)
    jobs = [(rng.choice(ACCOUNTS), f"sleep:{rng.uniform(0, 0.5):.3f}") for _ in range(200)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=100) as pool:
        results = list(pool.map(lambda job: post_run(provider.url, *job), jobs))
    run_ids = set()
    for account, nonce, response, _ in results:
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["owner_account_id"] == account
        assert body["stdout"] == f"echo {account} {nonce}"
        run_ids.add(body["run_id"])
    assert len(run_ids) == 200
    assert len(events_server.published("bus.containers.run.request")) == 200


def runs_across_a_restart(url, events_server, responder, count, down_seconds=5.0):
    """`count` runs (replies held ~4 s) in flight while the Events API restarts with its history.

    Returns each run's (account, nonce, response, finished at) and the time the API came back.
    """
    def one(n):
        account, nonce, response, _ = post_run(url, ACCOUNTS[n % 5], "sleep:4", timeout_seconds=30)
        return account, nonce, response, time.monotonic()

    with concurrent.futures.ThreadPoolExecutor(max_workers=count) as pool:
        in_flight = [pool.submit(one, n) for n in range(count)]
        events_server.wait_published("bus.containers.run.request", count=count, timeout=20)
        deadline = time.monotonic() + 10
        while len(responder.received("bus.containers.run.request")) < count:
            assert time.monotonic() < deadline, "the worker did not receive every run"
            time.sleep(0.02)
        events_server.stop()
        time.sleep(down_seconds)  # the replies fall due while it is down: the worker's publishes fail
        events_server.start()
        back = time.monotonic()
        return [future.result(timeout=90) for future in in_flight], back


def check_own_results(results, count):
    run_ids = set()
    for account, nonce, response, _ in results:
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["owner_account_id"] == account and body["stdout"] == f"echo {account} {nonce}"
        run_ids.add(body["run_id"])
    assert len(run_ids) == count


def test_an_events_api_restart_loses_no_run(provider, events_server, responder):
    results, back = runs_across_a_restart(provider.url, events_server, responder, 50)
    check_own_results(results, 50)
    assert responder.publish_retries > 0  # the replies really were published again after failing
    first = min(finished for *_, finished in results) - back
    found = sum(int(n) for n in re.findall(r"caught up on bus.containers.run.response: (\d+) of", provider.log()))
    print(f"\nEvents API restart: 50 runs in flight, {len(results)} results delivered, "
          f"first reply {first:.2f}s after the API came back, {found} found by catching up")
    wait_streams(events_server, per_name=2)


class TestInProcess:
    """The same load through the Flask app in this process, where the registry can be inspected."""

    @pytest.fixture
    def app_env(self, events_server):
        # Room for all 50 at once: this load is about replies, not run controls.
        return events_env(events_server, BUS_CONTAINERS_THREADS="64", BUS_CONTAINERS_MAX_RUNS_PER_ACCOUNT="0")

    def test_registry_is_empty_after_a_load_run(self, app, responder):
        client = connected(app).test_client()
        profiles = ["sleep:0.05", "never", "malformed", "wrong-owner", "error", "exit:2", "sleep:0"]

        def one(n):
            body = {"profile": profiles[n % len(profiles)], "args": ["x"], "timeout_seconds": 1}
            return client.post(RUNS, headers=bearer(ACCOUNTS[n % 5]), json=body).status_code

        with concurrent.futures.ThreadPoolExecutor(max_workers=50) as pool:
            statuses = list(pool.map(one, range(140)))
        assert sorted(set(statuses)) == [200, 403, 502, 503]
        assert app.extensions["bus_containers"].bus.registry.pending() == 0

    def test_registry_is_empty_after_an_events_api_restart(self, app, events_server, responder):
        from werkzeug.serving import make_server

        connected(app)
        server = make_server("127.0.0.1", 0, app, threaded=True)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            results, _ = runs_across_a_restart(f"http://127.0.0.1:{server.port}", events_server, responder, 20)
        finally:
            server.shutdown()
            thread.join(5)
        check_own_results(results, 20)
        assert app.extensions["bus_containers"].bus.registry.pending() == 0
