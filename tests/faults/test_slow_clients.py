"""Slow clients never starve the provider: request heads wait in the worker's poller, bodies on a deadline.

Served directly (gunicorn, 4 request threads) and through the shipped nginx config: 200
connections that each trickle half a request head leave a normal request answered within
1 s, and the trickled requests are still served once their heads are whole. With the
QuickWorker (the shipped worker, shorter deadlines) the head deadline drops a connection
whose head is still trickling in, and a body trickled past its deadline is a JSON 408 that
frees the thread for the next request.
"""
import json
import os
import socket
import time

import pytest
import requests

import processes
from bus_containers_provider.worker import BODY_TIMEOUT, HEAD_TIMEOUT, MAX_HEAD_BYTES
from conftest import bearer
from slow import PARTIAL_HEAD, closed_within, finish_and_read, trickling
from test_deploy import nginx

FAULTS = os.path.dirname(__file__)
TRICKLERS = 200
RUNS = "/api/v1/containers/runs"


def quick_provider(threads=1):
    env = processes.provider_env(BUS_CONTAINERS_THREADS=str(threads), BUS_CONTAINERS_WORKERS="1",
                                 PYTHONPATH=FAULTS)
    return processes.gunicorn_conf("-k", "quick_worker.QuickWorker", env=env)


def answered_promptly(url):
    """A readiness check and a run, each answered within 1 s."""
    ready = requests.get(f"{url}/readyz", timeout=1)
    assert ready.status_code == 200, ready.text
    run = requests.post(f"{url}{RUNS}", json={"image": "alpine", "command": ["true"]}, headers=bearer(), timeout=1)
    assert run.status_code == 200, run.text


def test_the_documented_deadlines_are_sane():
    assert 1 <= HEAD_TIMEOUT <= 60 and 1 <= BODY_TIMEOUT <= 120
    # An 8 KiB token and ordinary headers fit in a head.
    assert MAX_HEAD_BYTES >= 32 * 1024


def test_trickling_heads_hold_no_request_thread():
    port = processes.free_port()
    with processes.console_script("--backend", "static", "--threads", "4", port=port) as process:
        with trickling(port, TRICKLERS) as sockets:
            for _ in range(3):
                answered_promptly(process.url)
            # They were waiting, not dropped: each is answered once its head is whole.
            sockets.stop()
            statuses = {finish_and_read(sock) for sock in sockets}
            assert statuses == {b"HTTP/1.1 200 OK"}


def test_trickling_heads_through_the_shipped_nginx(tmp_path):
    upstream = processes.free_port()
    with nginx(tmp_path, upstream) as url, \
            processes.console_script("--backend", "static", "--threads", "4", port=upstream):
        port = int(url.rsplit(":", 1)[1])
        with trickling(port, TRICKLERS):
            for _ in range(3):
                answered_promptly(url)


def test_a_head_still_trickling_at_its_deadline_is_dropped():
    with quick_provider() as process:
        port = int(process.url.rsplit(":", 1)[1])
        with trickling(port, 3, interval=0.1) as sockets:
            # Bytes keep coming, yet the head deadline (1.5 s) is a total, not an idle timeout.
            assert all(closed_within(sock, 10) for sock in sockets)
            answered_promptly(process.url)
        assert "Traceback" not in process.log()


def test_a_slow_body_is_a_408_and_frees_its_thread():
    with quick_provider(threads=1) as process:
        port = int(process.url.rsplit(":", 1)[1])
        body = json.dumps({"image": "alpine", "command": ["x" * 200]}).encode()
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        with sock:
            head = (f"POST {RUNS} HTTP/1.1\r\nHost: provider\r\nContent-Type: application/json\r\n"
                    f"Authorization: {bearer()['Authorization']}\r\nContent-Length: {len(body)}\r\n\r\n")
            sock.sendall(head.encode())
            deadline = time.monotonic() + 10
            answer = b""
            sock.settimeout(0.2)
            for byte in body:
                assert time.monotonic() < deadline, "no answer to a body trickled past its deadline"
                try:
                    sock.send(bytes([byte]))
                    answer += sock.recv(4096)
                except socket.timeout:
                    continue
                except (ConnectionResetError, BrokenPipeError):
                    break
                if b"\r\n\r\n" in answer:
                    break
            sock.settimeout(5)
            while b"}" not in answer:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
        status, _, rest = answer.partition(b"\r\n")
        assert status.startswith(b"HTTP/1.1 408"), answer
        assert json.loads(rest.split(b"\r\n\r\n", 1)[1])["error"]["type"] == "request_timeout"
        # The only request thread is free again.
        answered_promptly(process.url)


def test_a_head_over_the_cap_is_a_json_431_at_once():
    with processes.console_script("--backend", "static") as process:
        port = int(process.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            # Exactly one byte over the cap, so the provider has read all of it when it answers.
            head = PARTIAL_HEAD + b"y\r\n" + b"".join(b"X-Fill-%03d: %s\r\n" % (i, b"f" * 1000) for i in range(70))
            sock.sendall(head[:MAX_HEAD_BYTES + 1])
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["type"] == "bad_request"


def test_a_whole_head_read_with_a_large_body_is_served():
    """One read may bring a whole head and more than the head cap of body: only the head counts."""
    body = json.dumps({"image": "alpine", "command": ["cat"], "stdin": "x" * (MAX_HEAD_BYTES * 2)}).encode()
    head = (f"POST {RUNS} HTTP/1.1\r\nHost: provider\r\nAuthorization: {bearer()['Authorization']}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    with processes.console_script("--backend", "static") as process:
        port = int(process.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(head + body)  # in one piece, as a client with the body at hand sends it
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["run_id"].startswith("run_")
