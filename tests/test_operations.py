"""What an operator relies on: request logs, redacted start-up config, graceful shutdown, long runs."""
import concurrent.futures
import json
import logging
import signal
import time
import os

import pytest
import requests

from conftest import EVENTS_TOKEN, SECRET, bearer, events_env
from processes import console_script, gunicorn_conf, provider_env

# Every test here waits on a provider, a stream or a server: a lost reply fails it at this bound.
pytestmark = pytest.mark.timeout(60)

RUNS = "/api/v1/containers/runs"


def request_lines(text):
    lines = []
    for line in text.splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


def events_process_env(server, **extra):
    listener = {k: v for k, v in events_env(server).items()
                if k.startswith("BUS_EVENTS_LISTENER") or k == "BUS_CONTAINERS_MAX_RUN_TIMEOUT"}
    return provider_env(BUS_API_TOKEN=EVENTS_TOKEN, BUS_CONTAINERS_BACKEND="events",
                        BUS_EVENTS_API_URL=server.url, **listener, **extra)


def test_one_json_line_per_request_with_request_id(client, caplog):
    caplog.set_level(logging.INFO, logger="bus_containers_provider.requests")
    headers = bearer("acct-a")
    run = client.post(RUNS, headers=dict(headers, **{"X-Request-Id": "trace-123"}), json={"profile": "codex"})
    run_id = run.get_json()["run_id"]
    assert run.headers["X-Request-Id"] == "trace-123"
    generated = client.get("/api/v1/containers/status", headers=dict(headers, **{"X-Request-Id": "bad id <script>"}))
    assert generated.headers["X-Request-Id"] not in ("", "bad id <script>") and len(generated.headers["X-Request-Id"]) == 32
    client.delete(f"{RUNS}/{run_id}", headers=headers)
    client.get("/api/v1/containers/status", headers={"Authorization": "Bearer not-a-token"})
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "bus_containers_provider.requests"]
    assert len(lines) == 4
    first = lines[0]
    assert first["request_id"] == "trace-123" and first["method"] == "POST"
    assert first["route"] == "/api/v1/containers/runs" and first["status"] == 200
    assert first["account"] == "acct-a" and first["run_id"] == run_id
    assert isinstance(first["duration_ms"], float) and isinstance(first["backend_ms"], float)
    assert first["time"].endswith("Z")
    assert lines[1]["request_id"] == generated.headers["X-Request-Id"]
    assert lines[2]["route"] == "/api/v1/containers/runs/<run_id>" and lines[2]["run_id"] == run_id
    assert lines[3]["status"] == 401 and lines[3]["account"] is None
    assert headers["Authorization"].split()[1] not in caplog.text and "not-a-token" not in caplog.text


def test_tokens_and_secrets_never_reach_the_process_output(events_server, responder):
    tokens = [bearer("acct-a")["Authorization"], bearer("ops", "container:admin", "ai.hg.fi/internal")["Authorization"]]
    with console_script(env=events_process_env(events_server)) as provider:
        url = provider.url
        run = requests.post(f"{url}{RUNS}", headers={"Authorization": tokens[0]}, timeout=10,
                            json={"image": "alpine", "command": ["echo", "hi"]})
        assert run.status_code == 200
        requests.get(f"{url}/api/v1/containers/status", headers={"Authorization": tokens[0]}, timeout=10)
        requests.delete(f"{url}{RUNS}/{run.json()['run_id']}", headers={"Authorization": tokens[0]}, timeout=10)
        requests.get(f"{url}/api/internal/containers/runner", headers={"Authorization": tokens[1]}, timeout=10)
        requests.get(f"{url}/api/v1/containers/status", headers={"Authorization": tokens[1]}, timeout=10)
    output = provider.output
    assert "configuration:" in output and "<redacted>" in output
    for secret in [SECRET, EVENTS_TOKEN] + [t.split()[1] for t in tokens]:
        assert secret not in output
    lines = [line for line in request_lines(output) if line["route"] != "/readyz"]
    assert [line["status"] for line in lines] == [200, 200, 200, 200, 401]
    assert lines[0]["backend_ms"] > 0


def test_sigterm_lets_in_flight_runs_finish_then_exits_0(events_server, responder):
    with console_script(env=events_process_env(events_server)) as provider:
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            runs = [pool.submit(requests.post, f"{provider.url}{RUNS}", headers=bearer(), timeout=30,
                                json={"profile": "sleep:3", "args": ["echo", str(n)], "timeout_seconds": 10})
                    for n in range(4)]
            events_server.wait_published("bus.containers.run.request", count=4, timeout=10)
            os.killpg(provider.pid, signal.SIGTERM)
            time.sleep(1.5)  # the gthread loop notices SIGTERM within a second
            # No new request is served: refused, or left unanswered in the closing socket's backlog.
            with pytest.raises((requests.ConnectionError, requests.ReadTimeout)):
                requests.get(f"{provider.url}/readyz", timeout=1)
            results = [future.result(timeout=30) for future in runs]
        assert [r.status_code for r in results] == [200] * 4
        assert sorted(r.json()["stdout"] for r in results) == [f"echo {n}" for n in range(4)]
        assert provider.wait(timeout=20) == 0
    assert events_server.open_streams() == responder_streams(responder)


def responder_streams(responder):
    return len(responder.names)  # only the responder's own streams remain open


def test_worker_timeout_never_kills_a_long_run(events_server, responder):
    with gunicorn_conf("--timeout", "2", env=events_process_env(events_server)) as provider:
        started = time.monotonic()
        response = requests.post(f"{provider.url}{RUNS}", headers=bearer(), timeout=30,
                                 json={"profile": "sleep:5", "args": ["long"], "timeout_seconds": 10})
        assert response.status_code == 200 and response.json()["stdout"] == "long"
        assert time.monotonic() - started >= 5
    assert "WORKER TIMEOUT" not in provider.output


@pytest.mark.parametrize("path,headers,status", [
    ("/api/v1/containers/runs/" + "a" * 5000, {}, 414),
    ("/api/v1/containers/status", {"Authorization": "Bearer " + "x" * 8300}, 401),
    ("/api/v1/containers/status", {"X-Padding": "x" * 20000}, 431),
])
def test_gunicorn_own_errors_are_json(path, headers, status):
    with console_script() as provider:
        response = requests.get(provider.url + path, headers=dict(bearer(), **headers), timeout=10)
    assert response.status_code == status
    assert response.headers["Content-Type"] == "application/json"
    assert response.json()["error"]["type"] in ("bad_request", "invalid_auth")
