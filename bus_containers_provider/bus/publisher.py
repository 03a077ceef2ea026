"""Publishing an event: one HTTP/1.1 POST on a kept-alive socket, without requests.

Through requests (Session, adapter, urllib3's pool, http.client and its
email-based header parser) a publish cost ~520 µs of CPU, a third of all the
provider spent on a run; written and read here it costs ~50 µs (BENCHMARKS.md).
None of what requests adds is wanted: the origin is fixed, a redirect is never
followed, no cookie, proxy or .netrc applies, and of the answer only the
status counts (the body is read, to keep the connection, and dropped).
"""
import select
import socket
import ssl
import threading
from typing import Optional
from urllib.parse import urlsplit

MAX_HEAD_BYTES = 64 * 1024
# An answer body beyond this is not read: the connection is closed instead of drained.
MAX_BODY_BYTES = 1024 * 1024
RECV_BYTES = 64 * 1024


class PublishFailed(Exception):
    """The POST did not get an answer: unreachable, cut off, or not HTTP."""


class PublishTimedOut(PublishFailed):
    """No connection or no answer within its timeout."""


class Publisher:
    """POSTs to one URL over a pool of kept-alive connections, each used by one thread at a time.

    The pool grows only to the number of publishes in flight at once; the
    most recently used connection is taken first (likeliest still open), and
    one the server has closed meanwhile is dropped before it is used.
    """

    def __init__(self, url: str, connect_timeout: float, read_timeout: float, ca_bundle: Optional[str] = None):
        parts = urlsplit(url)
        self._tls = ssl.create_default_context(cafile=ca_bundle or _default_bundle()) \
            if parts.scheme == "https" else None
        self._address = (parts.hostname, parts.port or (443 if self._tls else 80))
        host = parts.netloc.rpartition("@")[2]
        self._start = f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {host}\r\n".encode("ascii")
        self._timeouts = (connect_timeout, read_timeout)
        self._idle = []
        self._lock = threading.Lock()

    def post(self, body: bytes, headers: bytes) -> int:
        """The answer's status to a POST of `body`; `headers` are whole lines (`Name: value\\r\\n`)."""
        request = b"%s%sContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
            self._start, headers, len(body), body)
        connection = self._borrow()
        try:
            status, reusable = connection.exchange(request)
        except PublishFailed:
            connection.close()
            raise
        except socket.timeout as exc:
            connection.close()
            raise PublishTimedOut(type(exc).__name__) from exc
        except (OSError, ValueError) as exc:
            connection.close()
            raise PublishFailed(type(exc).__name__) from exc
        if reusable:
            with self._lock:
                self._idle.append(connection)
        else:
            connection.close()
        return status

    def _borrow(self) -> "_Connection":
        while True:
            with self._lock:
                connection = self._idle.pop() if self._idle else None
            if connection is None:
                return _Connection(self._address, self._tls, self._timeouts)
            if connection.usable():
                return connection
            connection.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()


def _default_bundle() -> str:
    import certifi  # what requests verifies against too

    return certifi.where()


class _Connection:
    """One socket to the Events API, opened on first use."""

    def __init__(self, address, tls, timeouts):
        self._address, self._tls, self._timeouts = address, tls, timeouts
        self._sock = None
        self._buffer = b""

    def usable(self) -> bool:
        """False when the server closed it (or sent something unasked) while it was idle."""
        if self._sock is None:
            return True
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        return not poller.poll(0)

    def exchange(self, request: bytes):
        """(status, whether the connection can carry another request)."""
        if self._sock is None:
            self._connect()
        self._sock.sendall(request)
        while True:
            status, headers = self._head()
            if status >= 200:
                break  # a 1xx is an interim answer: the real one follows
        return status, self._skip_body(headers)

    def _connect(self) -> None:
        connect, read = self._timeouts
        sock = socket.create_connection(self._address, timeout=connect)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is not None:
                sock = self._tls.wrap_socket(sock, server_hostname=self._address[0])
            sock.settimeout(read)
        except BaseException:
            sock.close()
            raise
        self._sock = sock

    def _recv(self) -> None:
        data = self._sock.recv(RECV_BYTES)
        if not data:
            raise PublishFailed("the connection closed before the answer")
        self._buffer += data

    def _head(self):
        while (end := self._buffer.find(b"\r\n\r\n")) < 0:
            if len(self._buffer) > MAX_HEAD_BYTES:
                raise PublishFailed("the answer's head is too large")
            self._recv()
        lines = self._buffer[:end].decode("latin-1").split("\r\n")
        self._buffer = self._buffer[end + 4:]
        version, _, rest = lines[0].partition(" ")
        code = rest[:3]
        if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
            raise PublishFailed("the answer is not HTTP/1")
        headers = {"version": version}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        return int(code), headers

    def _skip_body(self, headers: dict) -> bool:
        """Read past the answer's body; whether the connection is left at the start of the next answer."""
        keep = headers["version"] == "HTTP/1.1" and "close" not in headers.get("connection", "")
        if "chunked" in headers.get("transfer-encoding", ""):
            return keep and self._skip_chunks()
        length = headers.get("content-length")
        if length is None or not length.isdigit() or int(length) > MAX_BODY_BYTES:
            return False  # delimited by the close, or too large to drain
        while len(self._buffer) < int(length):
            self._recv()
        self._buffer = self._buffer[int(length):]
        return keep

    def _skip_chunks(self) -> bool:
        read = 0
        while True:
            while (end := self._buffer.find(b"\r\n")) < 0:
                self._recv()
            size = int(self._buffer[:end].split(b";")[0], 16)
            read += size
            if read > MAX_BODY_BYTES:
                return False
            if size == 0:  # the last chunk, then trailer lines until an empty one
                self._buffer = self._buffer[end + 2:]
                while (end := self._buffer.find(b"\r\n")) != 0:
                    if end < 0:
                        self._recv()
                    else:
                        self._buffer = self._buffer[end + 2:]
                self._buffer = self._buffer[2:]
                return True
            while len(self._buffer) < end + 2 + size + 2:
                self._recv()
            self._buffer = self._buffer[end + 2 + size + 2:]

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
