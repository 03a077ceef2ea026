"""Worker processes and their listeners (issue 11, point 5).

With gunicorn's `preload_app` the app is built once in the master and forked: nothing
may have started there. Each worker opens its own reply streams after fork, the master
none; a worker killed with SIGKILL is replaced, and the replacement opens its own streams
and serves. Who holds which stream is read from /proc: the Events API's peer sockets, by
the process that owns each.
"""
import os
import signal
import time
from pathlib import Path

import pytest
import requests

import processes
from bus_containers_provider.backends.events import EventsBackend
from conftest import bearer, events_env

STREAMS_PER_WORKER = len(EventsBackend.reply_names)  # no usage or billing backend here
DEADLINE = 15.0

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")


def _connected_inodes(port: int) -> set:
    """Inodes of established TCP sockets whose peer is 127.0.0.1:`port`."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                if remote_port == port and fields[3] == "01":  # ESTABLISHED
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
