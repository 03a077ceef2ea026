"""Worker processes and their listeners (issue 11, point 5).

With gunicorn's `preload_app` the app is built once in the master and forked: nothing
may have started there. Each worker opens its own reply streams after fork, the master
none; a worker killed with SIGKILL is replaced, and the replacement opens its own streams
and serves. Who holds which stream is read from /proc: the Events API's peer sockets, by
the process that owns each.

A burst of runs that the workers' run capacities hold together is never refused because
it landed unevenly (issue 22): one worker is stopped while the other fills up, so where
each connection goes is decided by the workers, not by which one happens to wake first.
"""
import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest
import requests

import processes
from bus_containers_provider.backends.events import EventsBackend
from conftest import EVENTS_TOKEN, bearer, events_env, token

STREAMS_PER_WORKER = len(EventsBackend.reply_names)  # no usage or billing backend here
DEADLINE = 15.0

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")


def _connected_inodes(port: int, local: bool = False) -> set:
    """Inodes of established TCP sockets whose peer (or, with `local`, whose own address) has `port`."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                address_port = int(fields[1 if local else 2].rsplit(":", 1)[1], 16)
                if address_port == port and fields[3] == "01":  # ESTABLISHED
                    inodes.add(fields[9])
    return inodes


def _socket_inodes(pid: int) -> set:
    found = set()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return found
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(target[len("socket:["):-1])
    return found


def _children(pid: int) -> set:
    kids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    # The command name (field 2) may hold spaces; the parent pid follows its ')'.
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if parent == pid:
                kids.add(int(entry))
    return kids


def streams_by_process(master: int, events_port: int) -> dict:
    """{pid: streams to the Events API} for the master and each of its workers."""
    peers = _connected_inodes(events_port)
    return {pid: len(_socket_inodes(pid) & peers) for pid in {master} | _children(master)}


def wait_for(predicate, what: str):
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {DEADLINE}s: {what}")


def test_preloaded_workers_each_have_their_own_listeners_and_a_killed_one_is_replaced(events_server, responder):
    events_port = int(events_server.url.rsplit(":", 1)[1])
    env = processes.provider_env(**events_env(events_server, BUS_CONTAINERS_WORKERS="2",
                                              BUS_EVENTS_LISTENER_REQUIRED="1"))
    with processes.gunicorn_conf("--preload", env=env) as process:
        master = process.pid

        def settled(expected_workers):
            streams = streams_by_process(master, events_port)
            workers = {pid: n for pid, n in streams.items() if pid != master}
            if len(workers) == expected_workers and all(n == STREAMS_PER_WORKER for n in workers.values()):
                return streams
            return None

        streams = wait_for(lambda: settled(2), "two workers with their streams")
        assert streams[master] == 0, streams
        first = set(streams) - {master}

        victim, survivor = sorted(first)
        os.kill(victim, signal.SIGKILL)
        streams = wait_for(lambda: (s := settled(2)) and victim not in s and s, "a replacement worker")
        assert streams[master] == 0, streams
        [replacement] = set(streams) - {master, survivor}

        # Only the replacement may accept while the survivor is stopped: its answer is the replacement's.
        os.kill(survivor, signal.SIGSTOP)
        try:
            response = requests.post(f"{process.url}/api/v1/containers/runs", headers=bearer(), timeout=20,
                                     json={"profile": "p", "args": ["echo", "replaced"]})
            ready = requests.get(f"{process.url}/readyz", timeout=10)
        finally:
            os.kill(survivor, signal.SIGCONT)
        assert response.status_code == 200, response.text
        assert response.json()["stdout"] == "echo replaced"
        assert ready.status_code == 200, ready.text
        run = events_server.published("bus.containers.run.request")[-1]
        assert run["payload"]["run_id"] == response.json()["run_id"]
    log = process.output
    assert "Traceback" not in log and "WORKER TIMEOUT" not in log, log


RUNS = "/api/v1/containers/runs"
RUN = "bus.containers.run.request"
THREADS, RESERVED = 5, 2
CAPACITY = THREADS - RESERVED  # runs per worker


def held(port: int, pid: int) -> int:
    """Connections to the provider's `port` that worker `pid` has accepted and holds."""
    return len(_socket_inodes(pid) & _connected_inodes(port, local=True))


def post_run(port: int, tag: str) -> socket.socket:
    """A run sent on its own connection; its answer is read later (`answer`)."""
    body = json.dumps({"profile": "held", "args": [tag], "timeout_seconds": 30}).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    sock.sendall((f"POST {RUNS} HTTP/1.1\r\nHost: provider\r\nAuthorization: Bearer {token()}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                  ).encode() + body)
    return sock


def answer(sock: socket.socket):
    """(status, body) of the answer on `sock`, read until the provider closes it."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def reply(events_url: str, request: dict) -> None:
    """Answer one published run request as the container integration would."""
    run = request["payload"]
    result = {"run_id": run["run_id"], "owner_account_id": run["owner_account_id"], "runner_name": "test",
              "image": "profile:held", "args": run["command"], "exit_code": 0, "stdout": "", "stderr": "",
              "duration_ms": 1, "runtime": {"state": "ready", "provider": "test"}}
    response = requests.post(f"{events_url}/api/v1/events", headers={"Authorization": f"Bearer {EVENTS_TOKEN}"},
                             json={"name": "bus.containers.run.response", "correlationId": request["correlationId"],
                                   "payload": result}, timeout=DEADLINE)
    assert response.status_code in (200, 202), response.text


def test_a_burst_that_both_workers_hold_together_is_never_refused(events_server):
    """One worker fills its run capacity alone; the next runs wait for the other, never a 503."""
    env = processes.provider_env(**events_env(events_server, BUS_CONTAINERS_WORKERS="2",
                                              BUS_CONTAINERS_THREADS=str(THREADS),
                                              BUS_CONTAINERS_RESERVED_THREADS=str(RESERVED),
                                              BUS_CONTAINERS_MAX_RUNS_PER_ACCOUNT="0"))
    with processes.gunicorn_conf(env=env) as process:
        port = int(process.url.rsplit(":", 1)[1])
        workers = wait_for(lambda: len(kids := _children(process.pid)) == 2 and sorted(kids), "two workers")
        assert events_server.wait_for_streams(2, "bus.containers.run.response", timeout=DEADLINE)
        # A worker shows its room once it accepts: open idle connections until each has taken one.
        probes = []
        while {pid for pid in workers if held(port, pid)} != set(workers):
            assert len(probes) < 100, "a worker never accepted a connection"
            probes.append(socket.create_connection(("127.0.0.1", port), timeout=DEADLINE))
            wait_for(lambda: sum(held(port, pid) for pid in workers) == len(probes), "the probe accepted")
        for probe in probes:
            probe.close()
        wait_for(lambda: not any(held(port, pid) for pid in workers), "the probes closed")

        filler, other = workers
        calls = []
        try:
            os.kill(other, signal.SIGSTOP)
            try:
                calls += [post_run(port, f"run-{n}") for n in range(CAPACITY)]
                assert len(events_server.wait_published(RUN, CAPACITY, timeout=DEADLINE)) == CAPACITY
                assert held(port, filler) == CAPACITY
                # The filler is full and the stopped worker has room: this one waits in the queue for it.
                calls.append(post_run(port, f"run-{CAPACITY}"))
            finally:
                os.kill(other, signal.SIGCONT)
            # Refused by the filler, it would never have been published.
            assert len(events_server.wait_published(RUN, CAPACITY + 1, timeout=DEADLINE)) == CAPACITY + 1
            calls += [post_run(port, f"run-{n}") for n in range(CAPACITY + 1, 2 * CAPACITY)]
            published = events_server.wait_published(RUN, 2 * CAPACITY, timeout=DEADLINE)
            assert len(published) == 2 * CAPACITY
            assert (held(port, filler), held(port, other)) == (CAPACITY, CAPACITY)

            # Both full: the next run is refused at once, and a readiness check is still answered.
            status, body = answer(post_run(port, "one-too-many"))
            assert status == 503 and body["error"]["type"] == "unavailable", body
            assert requests.get(f"{process.url}/readyz", timeout=DEADLINE).status_code == 200

            for request in published:
                reply(events_server.url, request)
            answers = [answer(sock) for sock in calls]
        finally:
            for sock in calls:
                sock.close()  # a failed test leaves none open
    assert [status for status, _ in answers] == [200] * 2 * CAPACITY, answers
    assert [body["args"] for _, body in answers] == [[f"run-{n}"] for n in range(2 * CAPACITY)]
    assert len(events_server.published(RUN)) == 2 * CAPACITY
