"""Every 503 carries Retry-After (CONTRACT §3), so retrying clients back off instead of hammering.

One scenario per way the provider can be unavailable: a reply that never comes, the Events API
refusing, failing or gone, a reply stream down, readiness waiting for listeners, this worker's
run capacity full, the state store unreachable, shutting down (readiness and a run cancelled by
the drain), gunicorn's own 5xx, and nginx's own 502/503/504 in the shipped config. After each
in-process scenario the waiter registry is empty.
"""
import concurrent.futures
import json
import re
import time
import socket

import pytest
import requests

import processes
from bus_containers_provider import create_app, lifecycle, start, stop
from bus_containers_provider.worker import write_json_error
from conftest import bearer, connected, env, events_env
from test_deploy import NGINX_CONF, nginx

STATUS = "/api/v1/containers/status"
RUNS = "/api/v1/containers/runs"
RUN_NAME = "bus.containers.run.request"


def assert_503(response, headers=None, body=None):
    headers = headers if headers is not None else response.headers
    body = body if body is not None else response.get_json()
    status = response.status_code if response is not None else 503
    assert status == 503, body
    assert body["error"]["type"] == "unavailable"
    assert re.fullmatch(r"[1-9][0-9]*", headers["Retry-After"]), headers


@pytest.fixture
def events_app(events_server, responder, request):
    extra = getattr(request, "param", {})
    app = create_app(events_env(events_server, **extra))
    start(app)
    connected(app)
    yield app
    assert app.extensions["bus_containers"].bus.registry.pending() == 0
    stop(app)


def run_body(profile="codex", timeout=5):
    return {"profile": profile, "args": ["x"], "timeout_seconds": timeout}


def test_a_reply_that_never_comes(events_app, responder):
    responder.modes["bus.containers.status.request"] = "never"
    assert_503(events_app.test_client().get(STATUS, headers=bearer()))
    assert_503(events_app.test_client().post(RUNS, json=run_body("never", 1), headers=bearer()))


@pytest.mark.parametrize("status", [401, 500, 503])
def test_the_events_api_refusing_or_failing(events_app, events_server, status):
    events_server.fail_publish(status)
    assert_503(events_app.test_client().get(STATUS, headers=bearer()))


def test_the_events_api_gone(events_app, events_server):
    events_server.stop()
    assert_503(events_app.test_client().get(STATUS, headers=bearer()))


@pytest.mark.parametrize("events_app", [{"BUS_EVENTS_LISTENER_REQUIRED": "1"}], indirect=True)
def test_a_reply_stream_down(events_app, events_server):
    bus = events_app.extensions["bus_containers"].bus
    events_server.fail_streams(503)
    events_server.drop_streams()
    client = events_app.test_client()
    # Once the status reply stream is seen down (bounded wait), readiness names it, and a
    # request that needs it is refused before anything is published.
    # (wait_connected returns at once while the stream still looks up: sleep, against a deadline.)
    deadline = time.monotonic() + 10
    while "bus.containers.status.response" not in bus.disconnected():
        assert time.monotonic() < deadline, "the dropped stream was never noticed"
        time.sleep(0.02)
    assert_503(client.get("/readyz"))
    published = len(events_server.published())
    assert_503(client.get(STATUS, headers=bearer()))
    assert len(events_server.published()) == published
    events_server.reset_faults()


@pytest.mark.parametrize("events_app", [{"BUS_CONTAINERS_THREADS": "3"}], indirect=True)
def test_this_workers_run_capacity_full(events_app, events_server):
    capacity = events_app.extensions["bus_containers"].controls.capacity
    assert capacity.size == 1
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(events_app.test_client().post, RUNS, json=run_body("sleep:1"), headers=bearer())
        assert events_server.wait_published(RUN_NAME, 1, timeout=5)
        assert_503(events_app.test_client().post(RUNS, json=run_body(), headers=bearer()))
        assert first.result(timeout=15).status_code == 200


def test_the_state_store_unreachable():
    app = create_app(env(BUS_CONTAINERS_STATE_URL=f"redis://127.0.0.1:{processes.free_port()}/0"))
    start(app)
    try:
        assert_503(app.test_client().post(RUNS, json=run_body(), headers=bearer()))
    finally:
        stop(app)


def test_shutting_down_readiness(client, app):
    assert client.get("/readyz").status_code == 200
    lifecycle.mark_draining(app)
    assert_503(client.get("/readyz"))


def test_shutting_down_cancels_a_waiting_run(events_app, events_server):
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(events_app.test_client().post, RUNS, json=run_body("never", 30), headers=bearer())
        assert events_server.wait_published(RUN_NAME, 1, timeout=5)
        events_app.extensions["bus_containers"].drain()
        assert_503(waiting.result(timeout=10))


@pytest.mark.parametrize("status,reason", [(500, "Internal Server Error"), (503, "Service Unavailable")])
def test_gunicorns_own_5xx(status, reason):
    ours, theirs = socket.socketpair()
    with ours, theirs:
        write_json_error(ours, status, reason, "")
        raw = theirs.recv(65536).decode("latin-1")
    head, _, body = raw.partition("\r\n\r\n")
    headers = dict(line.split(": ", 1) for line in head.split("\r\n")[1:])
    assert head.startswith(f"HTTP/1.1 {status} ")
    assert json.loads(body)["error"]["type"] == "unavailable"
    assert re.fullmatch(r"[1-9][0-9]*", headers["Retry-After"])


def nginx_error_location(name: str) -> str:
    # The body ends at the location's closing brace on its own line (the JSON in `return` has braces).
    match = re.search(r"location @%s \{\n(?P<body>.*?)\n    \}" % name, NGINX_CONF.read_text(), re.S)
    assert match, name
    return match["body"]


@pytest.mark.parametrize("status", [502, 503, 504])
def test_nginxs_own_5xx_say_when_to_retry(status):
    body = nginx_error_location(f"bus_containers_{status}")
    assert re.search(r"add_header\s+Retry-After\s+[1-9][0-9]*\s+always;", body), body


def test_nginx_answers_a_stopped_provider_with_retry_after(tmp_path):
    with nginx(tmp_path, processes.free_port()) as url:  # nothing listens upstream
        response = requests.get(f"{url}/readyz", timeout=10)
    assert response.status_code == 502
    assert response.json()["error"]["type"] == "bad_gateway"
    assert re.fullmatch(r"[1-9][0-9]*", response.headers["Retry-After"])
