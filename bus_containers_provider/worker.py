"""The gunicorn worker: gthread (one thread per request), safe against slow clients, JSON errors.

gunicorn's gthread worker hands a connection to a request thread as soon as its
first byte arrives, and the thread then blocks until the whole request head is
in. A few dozen clients that each send half a header hold every thread, and
nothing else is answered. This worker reads request heads in its poller
instead (non-blocking, no thread), and gives a connection a thread only once
its head is complete:

- HEAD_TIMEOUT: a request head must arrive whole within this many seconds of
  the connection opening (or, on a kept-alive connection, of its next request
  starting); after that the connection is dropped without an answer.
- MAX_HEAD_BYTES: a head larger than this is answered 431 at once.
- BODY_TIMEOUT: from a complete head, the body must arrive within this many
  seconds; a body still trickling in after that is answered 408 and the
  connection closed, so a slow body holds its thread for at most this long.

gunicorn also closes a finished "Connection: close" connection gracefully in
its main thread: it half-closes and then waits up to 2 s for the client to
close its side, during which nothing else is accepted or dispatched. Here
that linger (LINGER_SECONDS) happens in the poller too.

A worker whose connections reach its run capacity leaves new ones in the
kernel's queue while another worker has room (board.py), so a burst that the
workers can hold together is not refused by one of them.

On SIGTERM the worker closes its listening sockets at once (after taking the
connections the kernel already queued), so new connections are refused and
clients fail over, marks the app as draining (/readyz answers 503), and lets
requests in flight finish within gunicorn's graceful timeout.

TLS and HTTP/2 prior knowledge need the socket in the request thread from the
first byte; with either configured, connections take gunicorn's own path.
"""
import errno
import json
import logging
import selectors
import socket
import threading
import time
from functools import partial

from gunicorn import http, util
from gunicorn.http.unreader import SocketUnreader
from gunicorn.http2 import negotiation
from gunicorn.workers.gthread import TConn, ThreadWorker
from werkzeug.exceptions import RequestTimeout

from . import lifecycle
from .errors import HTTP_TYPES

log = logging.getLogger(__name__)

HEAD_TIMEOUT = 10.0
MAX_HEAD_BYTES = 64 * 1024
BODY_TIMEOUT = 30.0
# Enough for every retrying client's SYN queued while SIGTERM arrived, bounded so closing never stalls.
MAX_BACKLOG_ACCEPTS = 1024
RETRY_AFTER_SECONDS = 1
# A graceful close waits this long for the client's FIN (RFC 9112 §9.6), as gunicorn does.
LINGER_SECONDS = 2.0
LINGER_MAX_BYTES = 64 * 1024
# While this worker leaves connections to another, it looks at the board this often, so it takes
# them again soon after every worker is full (then non-run requests must still be answered).
DEFER_POLL_SECONDS = 0.05
# Starting every request thread at boot is bounded by this (a few thousand take well under a second),
# well inside gunicorn's worker timeout (30 s): no heartbeat is sent until boot is over.
THREAD_START_TIMEOUT = 10.0


def write_json_error(sock, status_int, reason, mesg):
    """gunicorn's own answers (request line too long, headers too large, bad framing), as the JSON envelope."""
    error_type = "unavailable" if status_int >= 500 else HTTP_TYPES.get(status_int, "bad_request")
    body = json.dumps({"error": {"type": error_type, "message": reason}}).encode()
    # Every 5xx may be retried; Retry-After tells a client how soon (CONTRACT §3).
    retry = f"Retry-After: {RETRY_AFTER_SECONDS}\r\n" if status_int >= 500 else ""
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"{retry}Content-Length: {len(body)}\r\n\r\n").encode("latin-1")
    util.write_nonblock(sock, head + body)


class DeadlineUnreader(SocketUnreader):
    """Reads a request from the socket, but never past its deadline (a monotonic time)."""

    def __init__(self, sock, deadline=None):
        super().__init__(sock)
        self.deadline = deadline
        self.expired = False

    def chunk(self, size_hint=None):
        if self.deadline is None:
            return super().chunk(size_hint)
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            self.expired = True
            raise RequestTimeout("the request body was not received in time")
        prior = self.sock.gettimeout()
        # A caller's own shorter bound (gunicorn's keep-alive drain) still applies.
        timeout = remaining if prior is None else min(prior, remaining)
        self.sock.settimeout(timeout)
        try:
            return super().chunk(size_hint)
        except TimeoutError:
            if timeout < remaining:
                raise
            self.expired = True
            raise RequestTimeout("the request body was not received in time") from None
        finally:
            self.sock.settimeout(prior)


class ProviderConn(TConn):
    """A connection whose graceful close lingers in its worker's poller, never in the main thread."""

    def __init__(self, worker, *args):
        super().__init__(*args)
        self.worker = worker

    def close(self, graceful=False):
        if graceful and self.worker.alive:
            self.worker.linger(self)
        else:
            super().close(graceful)


def start_threads(pool, count: int, timeout: float = THREAD_START_TIMEOUT) -> None:
    """Start all `count` threads of `pool` now, at boot, while nothing else wants the GIL.

    The pool otherwise starts a thread per request until it has `count`, in
    gunicorn's main thread, and Thread.start waits for the new thread to run:
    under a burst each start waits for the GIL twice behind hundreds of busy
    threads, so the main loop dispatched ~130 connections a second and, at
    thousands in flight, missed its heartbeat until the arbiter killed it.
    Each task waits at a barrier, so no thread is idle and every submit starts one.
    """
    gate = threading.Barrier(count + 1, timeout=timeout)
    for _ in range(count):
        pool.submit(gate.wait)
    try:
        gate.wait()
    except threading.BrokenBarrierError:
        log.warning("only some of the %d request threads started within %gs; the rest start on demand",
                    count, timeout)


class ProviderWorker(ThreadWorker):
    """gthread with request heads read in the poller, bounded bodies, JSON errors and a prompt drain."""

    head_timeout = HEAD_TIMEOUT
    max_head_bytes = MAX_HEAD_BYTES
    body_timeout = BODY_TIMEOUT
    # This worker's seat on the master's board (serving.py, pre_fork); without one it never defers.
    seat = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Connections whose head is arriving; insertion order is deadline order (one fixed timeout).
        self.heads = {}
        # Closed connections waiting for the client's FIN: conn -> deadline.
        self.lingering = {}
        self.listeners_closed = False

    def init_process(self):
        # gunicorn answers malformed requests before the app sees them, through util.write_error.
        util.write_error = write_json_error
        super().init_process()

    @property
    def worker_connections(self) -> int:
        """The most connections this worker takes now: gunicorn's limit, or what it holds while it defers."""
        limit, seat = self._connection_limit, self.seat
        if seat is not None and self.alive and self.nr_conns < limit and seat.full(self.nr_conns):
            return self.nr_conns
        return limit

    @worker_connections.setter
    def worker_connections(self, limit: int) -> None:
        self._connection_limit = limit

    def wait_for_and_dispatch_events(self, timeout):
        # Once a turn, after this turn's accepts and closes: the board is never more than a turn behind.
        if self.seat is not None and self.alive:
            self.seat.hold(self.nr_conns)
            if not self._accepting:
                timeout = min(timeout, DEFER_POLL_SECONDS)
        super().wait_for_and_dispatch_events(timeout)

    def get_thread_pool(self):
        pool = super().get_thread_pool()
        start_threads(pool, self.cfg.threads)
        return pool

    def accept(self, listener):
        # With several listeners readable in one turn, the gate holds from the connection that fills it.
        if self.nr_conns >= self.worker_connections:
            return
        try:
            client, addr = listener.accept()
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.ECONNABORTED):
                return
            raise
        self.nr_conns += 1
        self.enqueue_req(ProviderConn(self, self.cfg, client, addr, listener.getsockname()))

    # --- request heads, read in the poller ------------------------------------------

    def _reads_heads(self, conn) -> bool:
        return not self.cfg.is_ssl and not negotiation.prior_knowledge_allowed(self.cfg, conn.client)

    def enqueue_req(self, conn):
        """Every path to a request thread (accept, keep-alive, pipelining) waits here for a whole head."""
        if not self._reads_heads(conn):
            return super().enqueue_req(conn)
        if not hasattr(conn, "head"):
            conn.head = bytearray()
        if conn.parser is not None:
            conn.head += conn.parser.unreader.take_buffered()
        if self._head_complete(conn):
            return self._dispatch(conn)
        conn.sock.setblocking(False)
        conn.head_deadline = time.monotonic() + self.head_timeout
        self.heads[conn] = None
        # A kept-alive connection comes here because it is readable, and a new one has often
        # sent its request already: read at once, and wait in the poller only if nothing is there.
        if not self._read_head(conn, watched=False):
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_head_readable, conn))

    def _head_complete(self, conn) -> bool:
        head = conn.head
        if b"\r\n\r\n" in head:
            return True
        # A request line over gunicorn's limit: the parser refuses it (414) from what is buffered.
        line_limit = self.cfg.limit_request_line or self.max_head_bytes
        return b"\n" not in head and len(head) > line_limit + 2

    def _on_head_readable(self, conn, _sock):
        self._read_head(conn, watched=True)

    def _read_head(self, conn, watched: bool) -> bool:
        """Read what has arrived of the head: True once the connection is dispatched or dropped."""
        try:
            data = conn.sock.recv(self.max_head_bytes + 1)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            data = b""
        if not data:
            self._drop_head(conn, watched)
            return True
        conn.head += data
        # Only the head counts: one read may bring a whole head and the start of a large body.
        end = conn.head.find(b"\r\n\r\n")
        if (end if end >= 0 else len(conn.head)) > self.max_head_bytes:
            try:
                write_json_error(conn.sock, 431, "Request Header Fields Too Large", "")
            except OSError:
                pass
            self._drop_head(conn, watched)
            return True
        if self._head_complete(conn):
            self._forget_head(conn, watched)
            self._dispatch(conn)
            return True
        return False

    def _unwatch(self, waiting: dict, conn, watched: bool = True):
        """Take `conn` out of `waiting` (heads or lingering) and, if `watched`, out of the poller."""
        waiting.pop(conn, None)
        if not watched:
            return
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass

    def _forget_head(self, conn, watched: bool = True):
        self._unwatch(self.heads, conn, watched)

    def _drop_head(self, conn, watched: bool = True):
        self._forget_head(conn, watched)
        self.nr_conns -= 1
        conn.close()

    def _dispatch(self, conn):
        """Give the connection a request thread, its head buffered and its body on a deadline."""
        if conn.parser is None:
            conn.parser = http.get_parser(self.cfg, conn.sock, conn.client)
            conn.parser.unreader = DeadlineUnreader(conn.sock)
        conn.parser.unreader.unread(bytes(conn.head))
        conn.head = bytearray()
        if isinstance(conn.parser.unreader, DeadlineUnreader):
            conn.parser.unreader.deadline = time.monotonic() + self.body_timeout
        conn.data_ready = True  # no second wait for the first byte in the thread
        super().enqueue_req(conn)

    def murder_pending(self):
        """gunicorn's expiry of idle connections, and of heads and lingering closes past their deadline."""
        super().murder_pending()
        now = time.monotonic()
        for conn in list(self.heads):
            if conn.head_deadline > now:
                break
            self._drop_head(conn)
        for conn, deadline in list(self.lingering.items()):
            if deadline > now:
                break
            self._end_linger(conn)

    # --- graceful close, in the poller --------------------------------------------------

    def linger(self, conn):
        """Half-close now; close once the client has closed too, or at the linger deadline."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
            conn.sock.setblocking(False)
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_linger_readable, conn))
        except (OSError, KeyError, ValueError):
            util.close(conn.sock)
            return
        conn.lingered = 0
        self.lingering[conn] = time.monotonic() + LINGER_SECONDS

    def _on_linger_readable(self, conn, _sock):
        try:
            data = conn.sock.recv(LINGER_MAX_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        conn.lingered += len(data)
        if not data or conn.lingered >= LINGER_MAX_BYTES:
            self._end_linger(conn)

    def _end_linger(self, conn):
        self._unwatch(self.lingering, conn)
        util.close(conn.sock)

    def _keepalive_after(self, conn, keepalive):
        # A body past its deadline leaves the stream mid-request: close, never read on.
        unreader = conn.parser.unreader
        if getattr(unreader, "expired", False):
            return False
        try:
            return super()._keepalive_after(conn, keepalive)
        except RequestTimeout:
            return False

    # --- shutdown: refuse new connections at once -------------------------------------

    _drain_timer = None

    def handle_exit(self, sig, frame):
        if self.seat is not None:
            self.seat.leave()  # no other worker may wait for this one to take a connection
        app = getattr(self, "wsgi", None)
        if self.alive and app is not None:
            lifecycle.mark_draining(app)
        super().handle_exit(sig, frame)
        # In-flight runs may finish for the shutdown grace; then the ones still
        # waiting are cancelled, in the time gunicorn allows beyond it (serving.DRAIN_SECONDS).
        provider = getattr(app, "extensions", {}).get("bus_containers")
        if provider is not None and self._drain_timer is None:
            self._drain_timer = threading.Timer(provider.settings.shutdown_grace, provider.drain)
            self._drain_timer.daemon = True
            self._drain_timer.start()

    def set_accept_enabled(self, enabled):
        if self.listeners_closed:
            return
        if not self.alive:
            # The first call after SIGTERM: unregister from the poller, then close.
            super().set_accept_enabled(False)
            self._close_listeners()
            return
        super().set_accept_enabled(enabled)

    def _close_listeners(self):
        """Serve what the kernel already queued, then close, so the port refuses new connections."""
        for listener in self.sockets:
            listener.setblocking(False)
            for _ in range(MAX_BACKLOG_ACCEPTS):
                try:
                    client, addr = listener.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    if exc.errno == errno.ECONNABORTED:
                        continue
                    raise
                self.nr_conns += 1
                self.enqueue_req(ProviderConn(self, self.cfg, client, addr, listener.getsockname()))
            listener.close()
        self.listeners_closed = True
