"""The in-repo test Events API and responder (tests/eventsapi), in a process of their own.

In the benchmark's own process they would share its GIL with the callers
being timed. Run as `python -m benchmarks.inrepo PORT`; prints "ready".
"""
import contextlib
import signal
import subprocess
import sys
import threading

from .common import EVENTS_TOKEN, WORKER_TOKEN


@contextlib.contextmanager
def in_repo_events(port: int):
    """Yields the Events API root of the in-repo server, with its responder connected."""
    # Its responder reports every failed publish on stderr; the benchmark reports the figure instead.
    process = subprocess.Popen([sys.executable, "-m", "benchmarks.inrepo", str(port)], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    try:
        if process.stdout.readline().strip() != "ready":
            raise SystemExit("the in-repo Events API did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def main(port: int) -> None:
    from eventsapi import EventsServer, Responder

    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    with EventsServer(tokens={EVENTS_TOKEN: None, WORKER_TOKEN: None}, port=port) as server, \
            Responder(server.url, WORKER_TOKEN):
        print("ready", flush=True)
        stopping.wait()


if __name__ == "__main__":
    main(int(sys.argv[1]))
