"""SIGTERM stops accepting at once, and lets what is in flight finish (issue: shutdown drain).

The real provider (two gunicorn workers, events backend, real Events API and responder):
a run is in flight and a kept-alive connection is open when the master gets SIGTERM. Then
a new connection is refused (not queued to hang and be reset), /readyz on the open
connection answers 503 with Retry-After, the run still gets its 200, and the process
exits cleanly within the graceful timeout.
"""
import os
import signal
import socket
import threading
import time

import requests

import processes
from conftest import bearer, events_env

GRACE = 20


def http_get(sock, path: str):
    """One HTTP/1.1 request on an open connection; (status, headers, body)."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: provider\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, "the connection closed before an answer"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        body += sock.recv(4096)
    return int(lines[0].split()[1]), headers, body


def refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except ConnectionRefusedError:
        return True


def test_sigterm_refuses_new_connections_and_finishes_in_flight_runs(events_server, responder):
    port = processes.free_port()
    env = processes.provider_env(**events_env(events_server, BUS_CONTAINERS_SHUTDOWN_GRACE=f"{GRACE}s"))
    with processes.console_script("--backend", "events", "--events-url", events_server.url, "--workers", "2",
                                  port=port, env=env) as process:
        url = process.url
        result = {}

        def run():
            body = {"profile": "sleep:4", "args": ["true"], "timeout_seconds": 30}
            result["response"] = requests.post(f"{url}/api/v1/containers/runs", json=body, headers=bearer(),
                                               timeout=30)

        runner = threading.Thread(target=run)
        runner.start()
        events_server.wait_published("bus.containers.run.request", timeout=10)
        # Opened last: gunicorn closes a kept-alive connection after 2 s idle.
        kept = socket.create_connection(("127.0.0.1", port), timeout=10)
        assert http_get(kept, "/readyz")[0] == 200

        stopped_at = time.monotonic()
        os.kill(process.pid, signal.SIGTERM)  # the master only, as systemd (KillMode=mixed) does

        # A client connecting during the drain is refused at once, while the run is still going.
        deadline = time.monotonic() + 3
        while not refused(port):
            assert time.monotonic() < deadline, "the port still accepts connections after SIGTERM"
            time.sleep(0.02)
        assert runner.is_alive()

        # The connection that was already open asks for readiness: 503, with Retry-After.
        status, headers, body = http_get(kept, "/readyz")
        kept.close()
        assert status == 503, body
        assert int(headers["retry-after"]) >= 1
        assert b'"unavailable"' in body

        runner.join(timeout=30)
        response = result["response"]
        assert response.status_code == 200, response.text
        assert response.json()["exit_code"] == 0

        process.wait(timeout=GRACE + 5)
        assert time.monotonic() - stopped_at < GRACE
        assert process.returncode == 0
        log = process.log()
        assert "WORKER TIMEOUT" not in log and "Traceback" not in log
