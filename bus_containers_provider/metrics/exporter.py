"""The /metrics listener on its own address, and the gunicorn hooks that keep the workers' files.

The gunicorn master, before any worker exists, creates a fresh directory for
this start and names it in PROMETHEUS_MULTIPROC_DIR, so every worker forked
later writes its series there. It binds the metrics address itself (a busy
address fails the start, as the public one does) and hands the socket to a
small process of its own, which answers GET /metrics with the sum over every
worker's file. That process serves nothing else and never the public address;
it keeps no thread in the master, which forks workers for as long as it runs.
"""
import argparse
import json
import logging
import os
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from . import MULTIPROC_DIR

log = logging.getLogger("bus_containers_provider")

# The listener exits on its own within this long once the master is gone (even SIGKILLed).
PARENT_POLL_SECONDS = 1.0


def on_starting(server, addr) -> None:
    """Set up metrics for this start of `server` (the arbiter), which keeps the state across reloads."""
    if addr:
        server.metrics_exporter = Exporter(addr)
        server.metrics_exporter.prepare()


def when_ready(server) -> None:
    if (exporter := getattr(server, "metrics_exporter", None)) is not None:
        exporter.start_listener()


def child_exit(server, worker) -> None:
    if (exporter := getattr(server, "metrics_exporter", None)) is not None:
        exporter.worker_gone(worker.pid)


def on_exit(server) -> None:
    if (exporter := getattr(server, "metrics_exporter", None)) is not None:
        exporter.close()


class Exporter:
    """One start's metrics directory, metrics socket and listener process, held by the gunicorn master."""

    def __init__(self, addr: str):
        self.addr = addr
        self.directory = None
        self._socket = None
        self.process = None

    def prepare(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="bus-containers-metrics-")
        # Before any worker is forked, and before anything imports prometheus_client.
        os.environ[MULTIPROC_DIR] = self.directory
        try:
            self._socket = listen(self.addr)
        except OSError as exc:
            log.error("cannot listen for metrics on %s: %s", self.addr, exc.strerror or exc)
            self._remove_directory()
            raise SystemExit(1) from None

    def start_listener(self) -> None:
        if self._socket is None:
            return
        fd = self._socket.fileno()
        self.process = subprocess.Popen(
            [sys.executable, "-m", __name__, "--fd", str(fd), "--directory", self.directory,
             "--parent", str(os.getpid())],
            pass_fds=(fd,), stdin=subprocess.DEVNULL)
        self._socket.close()  # the listener owns it now
        self._socket = None
        log.info("metrics on http://%s/metrics (listener pid %d), aggregated from %s",
                 self.addr, self.process.pid, self.directory)

    def worker_gone(self, pid: int) -> None:
        # A dead worker's live gauges (runs in flight, listener state, usage backlog) leave the sums;
        # its counters and histograms stay, so totals never go backwards.
        if self.directory:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid, self.directory)

    def close(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
            self.process = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        self._remove_directory()

    def _remove_directory(self) -> None:
        if self.directory:
            shutil.rmtree(self.directory, ignore_errors=True)
            if os.environ.get(MULTIPROC_DIR) == self.directory:
                del os.environ[MULTIPROC_DIR]
            self.directory = None


def listen(addr: str) -> socket.socket:
    """A listening TCP socket on HOST:PORT (an IPv6 host may be bracketed)."""
    host, _, port = addr.rpartition(":")
    host = host.strip("[]")
    family, kind, proto, _, address = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(64)
    except OSError:
        sock.close()
        raise
    return sock


# --- the listener process -----------------------------------------------------

def _error(start_response, status: str, error_type: str, message: str, headers=()):
    body = json.dumps({"error": {"type": error_type, "message": message}}).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body))), *headers])
    return [body]


def metrics_app(directory: str):
    """WSGI app: GET /metrics is the sum over every worker's file; anything else is a JSON error."""
    from prometheus_client import CollectorRegistry, make_wsgi_app, multiprocess

    # Nothing in this process defines a series, so the registry holds only the workers' sums.
    registry = CollectorRegistry(support_collectors_without_names=True)
    multiprocess.MultiProcessCollector(registry, path=directory)
    exposition = make_wsgi_app(registry)

    def app(environ, start_response):
        if environ.get("PATH_INFO") != "/metrics":
            return _error(start_response, "404 Not Found", "not_found", "no such route")
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return _error(start_response, "405 Method Not Allowed", "method_not_allowed", "use GET",
                          [("Allow", "GET, HEAD")])
        return exposition(environ, start_response)

    return app


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a stuck scrape never holds up the exit

    def __init__(self, sock: socket.socket, app):
        super().__init__(sock.getsockname()[:2], _QuietHandler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.server_name, self.server_port = "metrics", sock.getsockname()[1]
        self.setup_environ()
        self.set_app(app)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):
        pass  # scrapes every few seconds would drown the request log


def serve(fd: int, directory: str, parent: int) -> None:
    server = _Server(socket.socket(fileno=fd), metrics_app(directory))
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()
    while not stopping.wait(PARENT_POLL_SECONDS):
        if os.getppid() != parent:
            break
    server.shutdown()
    server.server_close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="The provider's /metrics listener (started by the gunicorn master).")
    parser.add_argument("--fd", type=int, required=True, help="listening socket inherited from the master")
    parser.add_argument("--directory", required=True, help="the workers' multiprocess directory")
    parser.add_argument("--parent", type=int, required=True, help="the master's pid; exit when it is gone")
    args = parser.parse_args(argv)
    serve(args.fd, args.directory, args.parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
