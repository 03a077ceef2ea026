"""Run controls over real sockets: gunicorn processes, a shared redis-server, nginx, callers that leave."""
import concurrent.futures
import json
import signal
import socket
import time

import pytest
import requests

from conftest import EVENTS_TOKEN, bearer, events_env, token
from processes import console_script, provider_env
from redisserver import RedisServer

RUNS = "/api/v1/containers/runs"
RUN_NAME = "bus.containers.run.request"
DELETE_NAME = "bus.containers.delete.request"
USAGE = "bus.usage.record.request"


def served(events_server, *args, **variables):
    """The console script on the events backend against the test Events API."""
    listeners = {k: v for k, v in events_env(events_server).items() if k.startswith("BUS_EVENTS_LISTENER")}
    env = provider_env(BUS_API_TOKEN=EVENTS_TOKEN, BUS_CONTAINERS_RUN_TIMEOUT_GRACE="2s", **listeners, **variables)
    return console_script("--backend", "events", "--events-url", events_server.url, *args, env=env)


def wait_listening(events_server, processes, timeout=10.0):
    """Every provider process has its run reply stream open (one worker each)."""
    deadline = time.monotonic() + timeout
    while events_server.open_streams("bus.containers.run.response") < processes:
        assert time.monotonic() < deadline, "reply streams did not open"
        time.sleep(0.05)


def run(url, body, account="acct-a", key=None, timeout=30):
    headers = bearer(account)
    if key is not None:
        headers["Idempotency-Key"] = key
    return requests.post(f"{url}{RUNS}", json=body, headers=headers, timeout=timeout)


def held(seconds, tag="x"):
    return {"profile": f"sleep:{seconds}", "args": [tag], "timeout_seconds": 30}


@pytest.fixture
def redis_store():
    with RedisServer() as server:
        yield server


class TestTwoProcessesShareOneStore:
    @pytest.fixture
    def providers(self, events_server, responder, redis_store):
        options = ("--workers", "1", "--state-url", redis_store.url, "--max-runs-per-account", "2")
        with served(events_server, *options) as first, served(events_server, *options) as second:
            wait_listening(events_server, 2)
            yield first, second

    def test_the_account_limit_holds_across_processes(self, providers, events_server):
        first, second = providers
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            holding = [pool.submit(run, first.url, held(2, n)) for n in ("a", "b")]
            assert len(events_server.wait_published(RUN_NAME, 2, timeout=10)) == 2
            refused = run(second.url, held(0))
            other = run(second.url, held(0), account="acct-b")
            assert [f.result().status_code for f in holding] == [200, 200]
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["details"] == {"limit": 2, "in_flight": 2}
        assert other.status_code == 200
        assert run(second.url, held(0)).status_code == 200  # released in the store, seen by the other process

    def test_a_key_holds_across_processes(self, providers, events_server):
        first, second = providers
        body = held(1.5, "keyed")
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            original = pool.submit(run, first.url, body, key="across")
            assert events_server.wait_published(RUN_NAME, 1, timeout=10)
            joined = run(second.url, body, key="across")
            original = original.result()
        replayed = run(second.url, body, key="across")
        assert original.status_code == joined.status_code == replayed.status_code == 200
        assert original.json() == joined.json() == replayed.json()
        assert joined.headers["Idempotent-Replayed"] == replayed.headers["Idempotent-Replayed"] == "true"
        assert len(events_server.published(RUN_NAME)) == 1
        reused = run(first.url, held(1.5, "other body"), key="across")
        assert reused.status_code == 422 and reused.json()["error"]["type"] == "idempotency_key_reused"


def test_store_down_refuses_runs_and_nothing_else(events_server, responder, redis_store):
    with served(events_server, "--workers", "1", "--state-url", redis_store.url) as provider:
        wait_listening(events_server, 1)
        first = run(provider.url, held(0))
        assert first.status_code == 200
        redis_store.stop()
        published = len(events_server.published(RUN_NAME))
        refused = run(provider.url, held(0), key="while-down")
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "unavailable"
        assert int(refused.headers["Retry-After"]) >= 1
        assert len(events_server.published(RUN_NAME)) == published  # fail closed: nothing published
        ready = requests.get(f"{provider.url}/readyz", timeout=10)
        assert ready.status_code == 503 and "state" in ready.json()["error"]["message"]
        status = requests.get(f"{provider.url}/api/v1/containers/status", headers=bearer(), timeout=10)
        assert status.status_code == 200
        # A run with a record is read from it (§9): with the store away, a 503 to retry, never the backend's
        # item without its result; the list still answers from the backend.
        read = requests.get(f"{provider.url}{RUNS}/{first.json()['run_id']}", headers=bearer(), timeout=10)
        assert read.status_code == 503 and read.json()["error"]["type"] == "unavailable"
        assert int(read.headers["Retry-After"]) >= 1
        assert requests.get(f"{provider.url}{RUNS}", headers=bearer(), timeout=10).status_code == 200
        redis_store.start()
        assert requests.get(f"{provider.url}/readyz", timeout=10).status_code == 200
        # (this store keeps nothing across a restart: the run reads from the backend again)
        assert requests.get(f"{provider.url}{RUNS}/{first.json()['run_id']}", headers=bearer(),
                            timeout=10).status_code == 200
        assert run(provider.url, held(0), key="while-down").status_code == 200


def test_runs_never_starve_the_other_requests(events_server, responder):
    """With --threads 8 a worker holds 6 runs; the 7th is refused at once and reads still answer."""
    with served(events_server, "--workers", "1", "--threads", "8", "--max-runs-per-account", "0") as provider:
        wait_listening(events_server, 1)
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            holding = [pool.submit(run, provider.url, held(8, str(n)), f"acct-{n}") for n in range(6)]
            assert len(events_server.wait_published(RUN_NAME, 6, timeout=10)) == 6
            started = time.monotonic()
            # A 3 s bound for answers that, if they queued behind the runs, would take 8 s.
            refused = run(provider.url, held(0), account="acct-late", timeout=3)
            ready = requests.get(f"{provider.url}/readyz", timeout=3)
            status = requests.get(f"{provider.url}/api/v1/containers/status", headers=bearer(), timeout=3)
            listed = requests.get(f"{provider.url}{RUNS}", headers=bearer(), timeout=3)
            elapsed = time.monotonic() - started
            assert [f.result().status_code for f in holding] == [200] * 6
        assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
        assert (ready.status_code, status.status_code, listed.status_code) == (200, 200, 200)
        assert len(events_server.published(RUN_NAME)) == 6
        print(f"refusal, readyz, status and list answered in {elapsed:.3f}s while 6 runs held every run slot")


def raw_run(port, body, path=RUNS):
    """A POST whose caller can walk away: the socket, with the request sent."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall((f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token()}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode() + data)
    return sock


def assert_cancelled(events_server, url, run_id, left_at):
    [deleted] = events_server.wait_published(DELETE_NAME, 1, timeout=10)
    assert deleted["payload"] == {"run_id": run_id, "owner_account_id": "acct-a"}
    noticed = time.monotonic() - left_at
    deadline = time.monotonic() + 10
    while True:
        records = [e["payload"] for e in events_server.published(USAGE)]
        failed = [r for r in records if r["event_type"] == "container_run_failed"]
        if failed or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert [r["data"]["reason"] for r in failed] == ["cancelled"]
    assert [r["event_id"] for r in failed] == [f"{run_id}:container_run_failed"]
    assert not [r for r in records if r["event_type"] == "container_run_finished"]
    print(f"delete request published {noticed:.3f}s after the caller left")
    # The slot is free again: with a limit of one, the next run of the account runs.
    assert run(url, held(0)).status_code == 200
    return noticed


class TestTheCallerGoesAway:
    OPTIONS = ("--workers", "1", "--max-runs-per-account", "1", "--usage-backend", "events")

    def test_directly(self, events_server, responder):
        with served(events_server, *self.OPTIONS) as provider:
            wait_listening(events_server, 1)
            sock = raw_run(int(provider.url.rsplit(":", 1)[1]), held(20))
            [published] = events_server.wait_published(RUN_NAME, 1, timeout=10)
            sock.close()
            noticed = assert_cancelled(events_server, provider.url, published["payload"]["run_id"], time.monotonic())
        assert noticed < 2.0, f"the delete request came {noticed:.2f}s after the caller left"

    def test_through_the_shipped_nginx(self, events_server, responder, tmp_path):
        from test_deploy import nginx

        with served(events_server, *self.OPTIONS) as provider:
            wait_listening(events_server, 1)
            with nginx(tmp_path, int(provider.url.rsplit(":", 1)[1])) as front:
                sock = raw_run(int(front.rsplit(":", 1)[1]), held(20))
                [published] = events_server.wait_published(RUN_NAME, 1, timeout=10)
                sock.close()
                noticed = assert_cancelled(events_server, provider.url, published["payload"]["run_id"],
                                           time.monotonic())
        assert noticed < 2.0, f"the delete request came {noticed:.2f}s after the caller left"


def test_a_run_outlasting_the_shutdown_grace_is_cancelled(events_server, responder):
    with served(events_server, "--workers", "1", "--usage-backend", "events",
                BUS_CONTAINERS_SHUTDOWN_GRACE="1s") as provider:
        wait_listening(events_server, 1)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(run, provider.url, held(30))
            [published] = events_server.wait_published(RUN_NAME, 1, timeout=10)
            provider.send_signal(signal.SIGTERM)
            answer = pending.result(timeout=20)
        assert provider.wait(timeout=20) == 0
    run_id = published["payload"]["run_id"]
    assert answer.status_code == 503 and int(answer.headers["Retry-After"]) >= 1
    [deleted] = events_server.published(DELETE_NAME)
    assert deleted["payload"] == {"run_id": run_id, "owner_account_id": "acct-a"}
    failed = [e["payload"] for e in events_server.published(USAGE)
              if e["payload"]["event_type"] == "container_run_failed"]
    assert [r["data"]["reason"] for r in failed] == ["cancelled"]
