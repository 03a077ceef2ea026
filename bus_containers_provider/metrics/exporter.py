"""The gunicorn master's side of metrics: the workers' directory, the metrics socket, the listener process.

The gunicorn master, before any worker exists, creates a fresh directory for
this start and names it in PROMETHEUS_MULTIPROC_DIR, so every worker forked
later writes its series there. It binds the metrics address itself (a busy
address fails the start, as the public one does) and hands the socket to a
small process of its own, which answers GET /metrics with the sum over every
worker's file. That process serves nothing else and never the public address;
it keeps no thread in the master, which forks workers for as long as it runs.
"""
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile

from . import MULTIPROC_DIR, listener

log = logging.getLogger("bus_containers_provider")


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
            [sys.executable, "-m", listener.__name__, "--fd", str(fd), "--directory", self.directory,
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
