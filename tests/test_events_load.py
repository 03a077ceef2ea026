"""The events backend under concurrency: real gunicorn workers, real sockets, a real Events API."""
import concurrent.futures
import random
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
                        "--workers", "2", "--threads", "32", env=env) as process:
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


def test_events_api_restart_fails_in_flight_runs_then_recovers(provider, events_server):
    with concurrent.futures.ThreadPoolExecutor(max_workers=20) as pool:
        in_flight = [pool.submit(post_run, provider.url, ACCOUNTS[n % 5], "sleep:4", 5) for n in range(20)]
        events_server.wait_published("bus.containers.run.request", count=20, timeout=10)
        events_server.stop()
        time.sleep(2.0)  # longer than the listeners' down grace (1 s)
        events_server.start()
        results = [future.result(timeout=30) for future in in_flight]
    for _, _, response, elapsed in results:
        assert response.status_code == 503 and response.json()["error"]["type"] == "unavailable"
        assert elapsed < 5 + 2  # timeout_seconds + grace: they never wait past their bound
    wait_streams(events_server, per_name=2)
    account, nonce, response, _ = post_run(provider.url, "acct-0", "sleep:0")
    assert response.status_code == 200 and response.json()["stdout"] == f"echo acct-0 {nonce}"


class TestInProcess:
    """The same load through the Flask app in this process, where the registry can be inspected."""

    @pytest.fixture
    def app_env(self, events_server):
        return events_env(events_server)

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
