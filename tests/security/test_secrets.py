"""Secrets: the provider's BUS_API_TOKEN goes only to the configured Events origin, and neither
secret (it, nor the JWT key) shows in a command line, a log line, an error body or the OpenAPI
document. A plain-http Events URL to another host is warned about at start-up.
"""
import json
import logging

import pytest
import requests

import processes
from bus_containers_provider.bus.client import EventsClient, EventsUnavailable
from bus_containers_provider.config import load_settings
from bus_containers_provider.serving import gunicorn_options
from conftest import EVENTS_TOKEN, SECRET, bearer, env, events_env, token
from recorder import Recorder

PROVIDER_TOKEN = "provider-events-token-never-to-leave"


def accept(handler):
    body = json.dumps({"accepted": True, "id": "1", "name": "x"}).encode()
    handler.send_response(202)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


@pytest.fixture
def elsewhere():
    server = Recorder(accept)
    yield server
    server.close()


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])  # another host name; the same host, another port
def test_a_redirect_never_carries_the_token_to_another_origin(elsewhere, host):
    target = f"http://{host}:{elsewhere.port}"

    def redirect(handler):
        handler.send_response(307)
        handler.send_header("Location", target + handler.path)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    origin = Recorder(redirect)
    try:
        client = EventsClient(f"http://127.0.0.1:{origin.port}", PROVIDER_TOKEN)
        # A redirect is not followed: the answer is an error an operator can read, and nothing goes elsewhere.
        with pytest.raises(EventsUnavailable, match="redirect"):
            client.publish("bus.containers.status.request", "c-1", {"owner_account_id": "acct-a"})
        with pytest.raises(EventsUnavailable, match="redirect"):
            client.open_stream("bus.containers.status.response", read_timeout=2)
        client.close()
    finally:
        origin.close()
    assert origin.seen and all(h.get("Authorization") == f"Bearer {PROVIDER_TOKEN}" for _, _, h in origin.seen)
    assert elsewhere.seen == []


def starting_warnings(caplog, url):
    settings = load_settings(env(BUS_CONTAINERS_BACKEND="events", BUS_EVENTS_API_URL=url,
                                 BUS_API_TOKEN=PROVIDER_TOKEN))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bus_containers_provider"):
        gunicorn_options(settings)["on_starting"](None)
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("url", ["http://events.example.com", "http://10.1.2.3:8080", "http://[2001:db8::1]"])
def test_plain_http_to_another_host_is_warned_about(caplog, url):
    [warning] = starting_warnings(caplog, url)
    assert "plain http" in warning and "https" in warning
    assert PROVIDER_TOKEN not in warning


@pytest.mark.parametrize("url", ["https://events.example.com", "http://127.0.0.1:9", "http://localhost:9",
                                 "http://[::1]:9"])
def test_https_or_loopback_is_not_warned_about(caplog, url):
    assert starting_warnings(caplog, url) == []


def children(pid: int) -> list:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(child) for child in f.read().split()]


def test_neither_secret_shows_anywhere_outside_the_environment(events_server, responder):
    port = processes.free_port()
    provider_env = processes.provider_env(**events_env(events_server, BUS_EVENTS_LISTENER_REQUIRED="1"))
    assert provider_env["BUS_API_TOKEN"] == EVENTS_TOKEN
    secrets = [SECRET, EVENTS_TOKEN]
    with processes.console_script("--backend", "events", "--events-url", events_server.url, "--workers", "2",
                                  port=port, env=provider_env) as process:
        url = process.url
        bodies = []
        for response in (
            requests.get(f"{url}/api/v1/containers/openapi.json", headers=bearer(), timeout=10),
            requests.get(f"{url}/api/v1/containers/status", headers=bearer(), timeout=10),
            requests.get(f"{url}/api/v1/containers/status", timeout=10),
            requests.get(f"{url}/api/v1/containers/status", timeout=10,
                         headers={"Authorization": "Bearer " + token()[:-4] + "AAAA"}),
            requests.post(f"{url}/api/v1/containers/runs", data="{", timeout=10,
                          headers={**bearer(), "Content-Type": "application/json"}),
        ):
            bodies.append(response.text)
        events_server.fail_publish(401)  # the Events API refuses our token
        refused = requests.get(f"{url}/api/v1/containers/status", headers=bearer(), timeout=10)
        events_server.reset_faults()
        assert refused.status_code == 503
        bodies.append(refused.text)
        cmdlines = []
        for pid in [process.pid, *children(process.pid)]:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdlines.append(f.read().decode(errors="replace"))
        assert len(cmdlines) == 3
    for secret in secrets:
        for text in (*bodies, *cmdlines, process.output):
            assert secret not in text
