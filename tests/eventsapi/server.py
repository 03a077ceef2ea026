"""A real, in-process Bus Events API for tests (CONTRACT.md §5).

Stdlib only: ``ThreadingHTTPServer`` on 127.0.0.1, one daemon thread per
connection. Events are published with ``POST /api/v1/events`` and read from
chunked NDJSON streams at ``GET /api/v1/events/stream``.

Semantics worth knowing when writing tests:

* The correlation key is stored and streamed exactly as the publisher sent it:
  a body with ``correlation_id`` yields envelopes with ``correlation_id`` (no
  ``correlationId``), so a consumer's synonym handling can be exercised. A
  body with neither gets ``"correlationId": null``.
* A top-level ``error`` object in the published body is copied into the
  envelope, which is how workers publish failed replies.
* Unicast groups behave like Redis consumer groups: once a group has had a
  consumer, events published while it has none are kept and handed to the
  next consumer that joins; events queued on a consumer whose connection
  died are handed to another consumer of the group.
* History, groups and counters survive ``stop()``/``start()`` (a restarted
  Events API keeps its store); ``clear()`` forgets them.
"""

import itertools
import json
import logging
import queue
import re
import select
import socket
import threading
import time
from collections import deque
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[a-z0-9_-]+(\.[a-z0-9_-]+)*$")
MAX_NAME = 255
MAX_BODY = 1024 * 1024
# How often an idle stream checks whether its reader went away.
IDLE_CHECK = 0.25
_CLOSE = object()
JUNK_PIECE = b"x" * (1024 * 1024)


class _Junk:
    """A queued line of ``size`` bytes that is not JSON, written piece by piece."""

    def __init__(self, size):
        self.size = size


def _bool_param(value):
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise ValueError(value)


def _prefix_allows(prefixes, name):
    """``None`` allows every name; a prefix matches whole dot segments."""
    if prefixes is None:
        return True
    for prefix in prefixes:
        prefix = prefix.rstrip(".")
        if prefix in ("", "*") or name == prefix or name.startswith(prefix + "."):
            return True
    return False


def _peer_closed(sock):
    # A plain recv(MSG_PEEK) would first wait out the socket timeout; a poll
    # with 0 answers at once, and a readable socket with no data is at EOF.
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        if not poller.poll(0):
            return False
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class _Stream:
    """One open stream connection and the queue of envelopes it still owes."""

    def __init__(self, name, delivery, group, consumer, sock):
        self.name = name
        self.delivery = delivery
        self.group = group
        self.consumer = consumer
        self.sock = sock
        self.queue = queue.Queue()
        self.dropped = False

    def abort(self):
        self.dropped = True
        self.queue.put(_CLOSE)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False
    # The default backlog of 5 drops SYNs when a responder reconnects all its
    # streams at once, and the kernel retries only after a second.
    request_queue_size = 128

    def __init__(self, address, events):
        self.events = events
        self.closed = False
        super().__init__(address, _Handler)

    def handle_error(self, request, client_address):
        # Broken connections are normal in fault tests; keep the output clean.
        log.debug("connection error from %s", client_address, exc_info=True)


class EventsServer:
    """The Bus Events API on 127.0.0.1; see the module docstring."""

    def __init__(self, tokens=None, port=0, host="127.0.0.1"):
        if tokens is None:
            tokens = {"tok": None}
        if not isinstance(tokens, dict):
            tokens = {token: None for token in tokens}
        self.tokens = dict(tokens)
        self.host = host
        self.port = port
        self._lock = threading.Condition()
        self._ids = itertools.count(1)
        self._history = []
        self._streams = []
        self._opened = {}
        self._groups = {}
        self._connections = set()
        self._httpd = None
        self._thread = None
        self._publish_status = None
        self._publish_delay = 0.0
        self._stream_status = None
        self._stream_answers = []

    # -- lifecycle -------------------------------------------------------

    @property
    def url(self):
        return f"http://{self.host}:{self.port}"

    @property
    def running(self):
        return self._httpd is not None

    def start(self):
        """Listen (again) on ``self.port``; port 0 picks a free port once."""
        if self._httpd is not None:
            return self
        self._httpd = _HTTPServer((self.host, self.port), self)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
            name=f"eventsapi-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout=5.0):
        """Close the listener and every connection; the port is free after."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.closed = True
        httpd.shutdown()
        httpd.server_close()
        self.drop_streams()
        with self._lock:
            connections = list(self._connections)
        for sock in connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout)
        self.wait_for_streams(0, timeout=timeout)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def clear(self):
        """Forget history, unicast groups and counters (not open streams)."""
        with self._lock:
            self._history.clear()
            self._groups.clear()
            self._opened.clear()
            self._stream_answers.clear()

    # -- fault controls --------------------------------------------------

    def fail_publish(self, status=503):
        """Answer every publish with ``status`` until called with ``None``."""
        self._publish_status = status

    def delay_publish(self, seconds):
        """Hold every publish for ``seconds`` before handling it (0 resets)."""
        self._publish_delay = float(seconds)

    def fail_streams(self, status=503):
        """Refuse new streams with ``status`` until called with ``None``."""
        self._stream_status = status

    def accept_tokens(self, tokens):
        """From now on accept only ``tokens`` (a dict as in the constructor); open streams stay open."""
        self.tokens = dict(tokens) if isinstance(tokens, dict) else {token: None for token in tokens}

    def reset_faults(self):
        self._publish_status = None
        self._publish_delay = 0.0
        self._stream_status = None

    def send_junk_line(self, name, size):
        """Write one line of ``size`` bytes that is not JSON to the open broadcast streams of ``name``.

        It is written in 1 MiB pieces of one shared buffer, so the server never holds it whole.
        """
        with self._lock:
            victims = [s for s in self._streams if s.name == name and s.delivery == "broadcast"]
            for stream in victims:
                stream.queue.put(_Junk(size))
        return len(victims)

    def drop_streams(self, name=None):
        """Abruptly close open streams (of one name); returns how many."""
        with self._lock:
            victims = [s for s in self._streams if name in (None, s.name)]
        for stream in victims:
            stream.abort()
        return len(victims)

    # -- inspection for tests -------------------------------------------

    def published(self, name=None):
        """Copies of the stored envelopes, in publish order.

        Each also carries ``publisher_token`` (the bearer that published it),
        which is never streamed.
        """
        with self._lock:
            return [dict(e) for e in self._history if name in (None, e["name"])]

    def stream_answers(self, name=None):
        """``(time.monotonic(), status)`` of every stream request (of one name) answered, refusals included."""
        with self._lock:
            return [(at, status) for at, stream_name, status in self._stream_answers if name in (None, stream_name)]

    def open_streams(self, name=None):
        with self._lock:
            return sum(1 for s in self._streams if name in (None, s.name))

    def streams_opened(self, name=None):
        """Cumulative count of streams ever opened (for one name)."""
        with self._lock:
            if name is None:
                return sum(self._opened.values())
            return self._opened.get(name, 0)

    def wait_for_streams(self, count, name=None, timeout=5.0):
        """Wait until exactly ``count`` streams are open; returns success."""
        with self._lock:
            return self._lock.wait_for(
                lambda: self.open_streams(name) == count, timeout)

    def wait_published(self, name=None, count=1, timeout=5.0):
        """Wait for ``count`` envelopes (of one name); returns them all."""
        with self._lock:
            self._lock.wait_for(lambda: len(self.published(name)) >= count, timeout)
            return self.published(name)

    # -- broker (called from handler threads) ---------------------------

    def _publish(self, body, token):
        envelope = {"id": None, "name": body["name"]}
        if "correlation_id" in body and "correlationId" not in body:
            envelope["correlation_id"] = body["correlation_id"]
        else:
            envelope["correlationId"] = body.get("correlationId")
        envelope["payload"] = body["payload"]
        if "error" in body:
            envelope["error"] = body["error"]
        envelope["createdAt"] = datetime.now(timezone.utc).isoformat()
        with self._lock:
            # Stamped under the lock so ids increase in history order.
            envelope["id"] = str(next(self._ids))
            self._history.append(dict(envelope, publisher_token=token))
            for stream in self._streams:
                if stream.name == envelope["name"] and stream.delivery == "broadcast":
                    stream.queue.put(envelope)
            for (name, _), group in self._groups.items():
                if name == envelope["name"]:
                    self._hand_to_group(group, envelope)
            self._lock.notify_all()
        return envelope

    def _hand_to_group(self, group, envelope):
        consumers = [s for s in group["members"] if not s.dropped]
        if not consumers:
            group["backlog"].append(envelope)
            return
        group["next"] = (group["next"] + 1) % len(consumers)
        consumers[group["next"]].queue.put(envelope)

    def _open_stream(self, stream, replay):
        """Register ``stream``; returns the history it must send first."""
        with self._lock:
            self._opened[stream.name] = self._opened.get(stream.name, 0) + 1
            self._streams.append(stream)
            if stream.delivery == "unicast":
                group = self._groups.setdefault(
                    (stream.name, stream.group),
                    {"members": [], "backlog": deque(), "next": -1})
                group["members"].append(stream)
                while group["backlog"]:
                    stream.queue.put(group["backlog"].popleft())
            self._lock.notify_all()
            if not replay:
                return []
            return [self._public(e) for e in self._history if e["name"] == stream.name]

    def _close_stream(self, stream, unsent=()):
        with self._lock:
            stream.dropped = True
            self._streams.remove(stream)
            pending = list(unsent)
            while True:
                try:
                    item = stream.queue.get_nowait()
                except queue.Empty:
                    break
                if item is not _CLOSE:
                    pending.append(item)
            group = self._groups.get((stream.name, stream.group))
            if stream.delivery == "unicast" and group is not None:
                group["members"].remove(stream)
                for envelope in pending:
                    self._hand_to_group(group, envelope)
            self._lock.notify_all()

    @staticmethod
    def _public(record):
        return {k: v for k, v in record.items() if k != "publisher_token"}

    def _answered_stream(self, name, status):
        with self._lock:
            self._stream_answers.append((time.monotonic(), name, status))
            self._lock.notify_all()

    def _track(self, sock, add):
        with self._lock:
            (self._connections.add if add else self._connections.discard)(sock)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Idle keep-alive connections give up eventually; stop() closes them anyway.
    timeout = 60

    @property
    def events(self):
        return self.server.events

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.events._track(self.connection, True)
        if self.server.closed:
            # Accepted just before stop(): stop() did not see this connection.
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def finish(self):
        self.events._track(self.connection, False)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format, *args):
        log.debug("%s " + format, self.address_string(), *args)

    # -- plumbing --------------------------------------------------------

    def _send_json(self, status, body, headers=()):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in headers:
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status, type_, message):
        headers = [("WWW-Authenticate", "Bearer")] if status == 401 else []
        self._send_json(status, {"error": {"type": type_, "message": message}}, headers)

    def _token(self):
        """The caller's token if valid; otherwise answers 401 and returns None."""
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or token not in self.events.tokens:
            self._error(401, "invalid_auth", "a valid bearer token is required")
            return None
        return token

    def _check_name(self, name, token):
        """Answers 400/403 and returns False when ``name`` cannot be used."""
        if not isinstance(name, str) or len(name) > MAX_NAME or not NAME_RE.match(name):
            self._error(400, "bad_request", "name must be dot-separated lowercase "
                        "identifiers (letters, digits, '-', '_'), no wildcards")
            return False
        # .get: accept_tokens() may have dropped the token since _token() checked it.
        if not _prefix_allows(self.events.tokens.get(token, ()), name):
            self._error(403, "forbidden", f"token may not use {name}")
            return False
        return True

    def _read_body(self):
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY:
            self.close_connection = True
            return None
        return self.rfile.read(length)

    # -- routes ----------------------------------------------------------

    def do_POST(self):
        path = urlsplit(self.path).path
        if path == "/api/v1/events/stream":
            return self._error(405, "method_not_allowed", "use GET")
        if path != "/api/v1/events":
            return self._error(404, "not_found", "no such route")
        raw = self._read_body()
        if raw is None:
            return self._error(413, "payload_too_large", "body over 1 MiB")
        token = self._token()
        if token is None:
            return
        if self.events._publish_delay:
            time.sleep(self.events._publish_delay)
        if self.events._publish_status:
            return self._error(self.events._publish_status, "unavailable",
                               "publish refused by fault control")
        try:
            body = json.loads(raw)
        except (TypeError, ValueError):
            return self._error(400, "bad_request", "body is not JSON")
        if not isinstance(body, dict):
            return self._error(400, "bad_request", "body must be a JSON object")
        if not self._check_name(body.get("name"), token):
            return
        if not isinstance(body.get("payload"), dict):
            return self._error(400, "bad_request", "payload must be an object")
        for key in ("correlationId", "correlation_id"):
            if body.get(key) is not None and not isinstance(body[key], str):
                return self._error(400, "bad_request", f"{key} must be a string")
        if "error" in body and not isinstance(body["error"], dict):
            return self._error(400, "bad_request", "error must be an object")
        envelope = self.events._publish(body, token)
        self._send_json(202, {"accepted": True, "id": envelope["id"],
                              "name": envelope["name"]})

    def send_response(self, code, message=None):
        if self.command == "GET" and urlsplit(self.path).path == "/api/v1/events/stream":
            name = parse_qs(urlsplit(self.path).query).get("name", [None])[-1]
            self.events._answered_stream(name, code)
        super().send_response(code, message)

    def do_GET(self):
        url = urlsplit(self.path)
        if url.path == "/api/v1/events":
            return self._error(405, "method_not_allowed", "use POST")
        if url.path != "/api/v1/events/stream":
            return self._error(404, "not_found", "no such route")
        token = self._token()
        if token is None:
            return
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        name = query.get("name")
        if not self._check_name(name, token):
            return
        delivery = query.get("delivery", "broadcast")
        if delivery not in ("broadcast", "unicast"):
            return self._error(400, "bad_request", "delivery must be broadcast or unicast")
        if delivery == "unicast" and not query.get("group"):
            return self._error(400, "bad_request", "unicast delivery needs a group")
        try:
            replay = _bool_param(query.get("replay", "false"))
            follow = _bool_param(query.get("follow", "true"))
        except ValueError:
            return self._error(400, "bad_request", "replay/follow must be true or false")
        if self.events._stream_status:
            return self._error(self.events._stream_status, "unavailable",
                               "stream refused by fault control")
        self._stream(_Stream(name, delivery if follow else "replay", query.get("group"),
                             query.get("consumer"), self.connection), replay, follow)

    def _not_allowed(self):
        if urlsplit(self.path).path in ("/api/v1/events", "/api/v1/events/stream"):
            return self._error(405, "method_not_allowed", "method not allowed")
        self._error(404, "not_found", "no such route")

    do_PUT = do_PATCH = do_DELETE = _not_allowed

    # -- streaming -------------------------------------------------------

    def _write_line(self, envelope):
        if isinstance(envelope, _Junk):
            return self._write_junk(envelope.size)
        data = json.dumps(envelope).encode() + b"\n"
        # One sendall per chunk, so TCP_NODELAY pushes the line out at once.
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _write_junk(self, size):
        piece = memoryview(JUNK_PIECE)
        while size > 0:
            part = piece[:min(size, len(piece))]
            self.wfile.write(b"%x\r\n" % len(part))
            self.wfile.write(part)
            self.wfile.write(b"\r\n")
            size -= len(part)
        self.wfile.write(b"1\r\n\n\r\n")

    def _stream(self, stream, replay, follow):
        self.close_connection = True
        history = self.events._open_stream(stream, replay)
        unsent = []
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            for envelope in history:
                self._write_line(envelope)
            if not follow:
                self.wfile.write(b"0\r\n\r\n")
                return
            while not stream.dropped:
                try:
                    item = stream.queue.get(timeout=IDLE_CHECK)
                except queue.Empty:
                    if _peer_closed(self.connection):
                        return
                    continue
                if item is _CLOSE:
                    return
                if _peer_closed(self.connection):
                    unsent.append(item)
                    return
                try:
                    self._write_line(item)
                except OSError:
                    unsent.append(item)
                    return
        except OSError:
            return
        finally:
            self.events._close_stream(stream, unsent)
