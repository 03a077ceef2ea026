"""Start the real provider process on a free port and wait, bounded, until it answers."""
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(sys.executable).parent / "bus-api-provider-containers"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def provider_env(**extra) -> dict:
    from conftest import SECRET

    base = {k: v for k, v in os.environ.items() if not k.startswith(("BUS_", "GUNICORN"))}
    return {**base, "BUS_CONTAINERS_JWT_SECRET": SECRET, **extra}


def wait_ready(url: str, process, timeout: float = 20.0, path: str = "/readyz") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"provider exited with {process.returncode}: {process.log()}")
        with contextlib.suppress(requests.RequestException):
            requests.get(f"{url}{path}", timeout=1)
            return
        time.sleep(0.1)
    raise AssertionError(f"provider at {url} did not answer within {timeout}s")


@contextlib.contextmanager
def running(command, env, port, ready_path="/readyz"):
    """Run `command` (a provider serving on `port`) and stop it with SIGTERM afterwards.

    Output goes to a file, not a pipe, so a chatty server can never block on a full pipe.
    """
    with tempfile.TemporaryFile(mode="w+") as output:
        process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT,
                                   text=True, start_new_session=True)
        process.url = f"http://127.0.0.1:{port}"
        process.log = lambda: (output.flush(), output.seek(0), output.read())[2]
        try:
            wait_ready(process.url, process, path=ready_path)
            yield process
        finally:
            stop(process)
            process.output = process.log()


def stop(process, sig=signal.SIGTERM, timeout=20):
    if process.poll() is None:
        os.killpg(process.pid, sig)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)


def children(pid: int) -> set:
    """Pids of the live processes whose parent is `pid` (a gunicorn master's workers), read from /proc."""
    kids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    # The command name (field 2) may hold spaces; state and parent pid follow its ')'.
                    state, parent = stat.read().rsplit(")", 1)[1].split()[:2]
            except (OSError, ValueError):
                continue
            if int(parent) == pid and state != "Z":
                kids.add(int(entry))
    return kids


def console_script(*args, port=None, env=None):
    """The installed `bus-api-provider-containers` serving on a free port."""
    port = port or free_port()
    return running([str(SCRIPT), "--addr", f"127.0.0.1:{port}", *args], env or provider_env(), port)


def gunicorn_conf(*args, env=None, port=None):
    """`gunicorn -c gunicorn.conf.py wsgi:app [args]`, configured from the environment alone."""
    port = port or free_port()
    env = dict(env or provider_env(), BUS_CONTAINERS_ADDR=f"127.0.0.1:{port}")
    gunicorn = Path(sys.executable).parent / "gunicorn"
    return running([str(gunicorn), "-c", "gunicorn.conf.py", *args, "wsgi:app"], env, port)
