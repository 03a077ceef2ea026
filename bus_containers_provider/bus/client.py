"""Bus Events API client: publish events and read NDJSON reply streams (requests)."""
import json
import logging
import os
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import requests
import urllib3

from ..credentials import StaticToken

log = logging.getLogger(__name__)

EVENTS_PATH = "/api/v1/events"
# A reply line carries a whole run result; a longer one is discarded as it is read (CONTRACT §5).
MAX_LINE_BYTES = 16 * 1024 * 1024
READ_CHUNK = 64 * 1024
# The provider's own token is missing, wrong, or lacks the event's resource.
UNAUTHORIZED = frozenset({401, 403})


class EventsError(Exception):
    """Base of every failure to use the Events API."""


class EventsUnavailable(EventsError):
    """Unreachable, timed out, or a 5xx; trying again later is safe for streams.

    A publish that timed out may still have been delivered, so a caller that
    retries a publish must be prepared for the event to arrive twice.
    """


class ReplyTimeout(EventsUnavailable):
    """No reply within the wait; the request may still be carried out, so a retry may repeat it."""


class ListenerDown(EventsUnavailable):
    """The reply stream for this request is not connected, so no reply could arrive."""


class EventsRejected(EventsError):
    """The API refused our request with a 4xx."""

    # Statuses that say the request itself is malformed: sending it again cannot help.
    MALFORMED = frozenset({400, 404, 413, 422})

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status

    @property
    def unauthorized(self) -> bool:
        """401/403: the provider's own token is missing, wrong, or lacks the event's resource."""
        return self.status in UNAUTHORIZED

    @property
    def malformed(self) -> bool:
        return self.status in self.MALFORMED


def new_session() -> requests.Session:
    """A Session that reads no proxy settings or .netrc from the environment on every request.

    With trust_env (requests' default) each publish looks up proxy variables,
    no_proxy and ~/.netrc again. The Events API is reached directly with our
    own bearer; a private CA bundle named by REQUESTS_CA_BUNDLE or
    CURL_CA_BUNDLE is still used, read once here.
    """
    session = requests.Session()
    session.trust_env = False
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if bundle:
        session.verify = bundle
    return session


class EventsClient:
    """Publishes over a pool of Sessions, each used by one thread at a time; streams with a Session per listener.

    A run's request thread publishes once and then waits: a Session (and its
    kept-alive connection) per thread would be built and connected afresh for
    nearly every run in a burst. Publishes borrow an idle Session instead, the
    most recently used first (its connection is the likeliest still open), so
    the pool grows only to the number of publishes in flight at once.
    """

    def __init__(self, base_url: str, token, connect_timeout: float = 5.0, publish_timeout: float = 30.0):
        self._url = base_url.rstrip("/") + EVENTS_PATH
        # A str is fixed; a token source (credentials.TokenFile) may hand out a new token while we run.
        self._token = StaticToken(token) if isinstance(token, str) else token
        self._timeouts = (connect_timeout, publish_timeout)
        self._connect_timeout = connect_timeout
        self._local = threading.local()
        self._sessions = []
        self._idle = []  # sessions no thread is using, most recently returned last
        self._lock = threading.Lock()

    def __repr__(self):
        return f"EventsClient({self._url!r})"  # never the token

    def _new_session(self) -> requests.Session:
        session = new_session()
        with self._lock:
            self._sessions.append(session)
        return session

    def _session(self) -> requests.Session:
        """This thread's own Session, for a stream opened without one (it holds its connection while open)."""
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = self._new_session()
        return session

    @contextmanager
    def _borrowed(self) -> Iterator[requests.Session]:
        with self._lock:
            session = self._idle.pop() if self._idle else None
        session = session or self._new_session()
        try:
            yield session
        finally:
            with self._lock:
                self._idle.append(session)

    @property
    def token_generation(self) -> int:
        """Changes whenever the token in use changes: a refused stream may be worth trying again."""
        self._token.value()
        return self._token.generation

    def _authorized(self, send: Callable[[dict], requests.Response]) -> requests.Response:
        """`send(headers)` with our token; if it is refused and the token source has another, once more with that.

        A 401/403 means the Events API took nothing, so the second send cannot deliver anything twice.
        """
        token = self._token.value()
        response = send({"Authorization": f"Bearer {token}"})
        if response.status_code in UNAUTHORIZED:
            fresh = self._token.reread()
            if fresh != token:
                response.close()
                response = send({"Authorization": f"Bearer {fresh}"})
        return response

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions, self._idle = self._sessions, [], []
        for session in sessions:
            session.close()

    def publish(self, name: str, correlation_id: str, payload: dict) -> None:
        body = {"name": name, "correlationId": correlation_id, "payload": payload}

        def send(headers):
            # Prepared without the Session: its cookie jar and default headers would be merged into
            # every publish (~100 µs), and the Events API needs neither.
            prepared = requests.Request("POST", self._url, headers=headers, json=body).prepare()
            # Never follow a redirect: the token and the payload go to the configured origin or nowhere.
            with self._borrowed() as session:
                return session.send(prepared, timeout=self._timeouts, allow_redirects=False)

        try:
            response = self._authorized(send)
        except requests.Timeout as exc:
            raise EventsUnavailable(f"publishing {name} timed out") from exc
        except requests.RequestException as exc:
            raise EventsUnavailable(f"publishing {name} failed: {type(exc).__name__}") from exc
        _check(response, f"publishing {name}")

    def open_stream(self, name: str, read_timeout: float, session: Optional[requests.Session] = None, *,
                    replay: bool = False, follow: bool = True) -> requests.Response:
        """The open (200) streamed response for `name`; read it with `envelopes`, close it when done."""
        session = session or self._session()
        params = {"name": name, "delivery": "broadcast"}
        if replay:
            params["replay"] = "true"
        if not follow:
            params["follow"] = "false"

        def send(headers):
            return session.get(f"{self._url}/stream", params=params, headers=headers, stream=True,
                               timeout=(self._connect_timeout, read_timeout), allow_redirects=False)

        try:
            response = self._authorized(send)
        except requests.RequestException as exc:
            raise EventsUnavailable(f"opening the {name} stream failed: {type(exc).__name__}") from exc
        try:
            _check(response, f"opening the {name} stream")
        except EventsError:
            response.close()
            raise
        return response

    def stream(self, name: str, idle_timeout: float, on_open: Callable[[object], None] = lambda r: None,
               session: Optional[requests.Session] = None) -> Iterator[dict]:
        """Envelopes from the broadcast stream of `name`, until it ends (a clean return).

        Silence longer than `idle_timeout` ends the stream too, quietly.
        `on_open` receives the raw response once connected, so another thread
        can interrupt a blocked read with `raw.shutdown()`.
        """
        with self.open_stream(name, idle_timeout, session) as response:
            on_open(response.raw)
            yield from envelopes(response.raw, name)


def envelopes(raw, name: str, touched: Callable[[], None] = lambda: None,
              unwanted: Callable[[bytes], bool] = lambda line: False,
              before_read: Callable[[], None] = lambda: None) -> Iterator[dict]:
    """Envelopes read from a stream's raw body until it ends; `touched` is called for every chunk read.

    A line for which `unwanted` is true is dropped unparsed (the registry's
    check for another process's reply: cheaper than json.loads of a whole result).
    `before_read` may hold the next read back, so that lines nobody waits for are read in batches.

    A read timeout is a quiet end. A line over MAX_LINE_BYTES is dropped while
    it is read, never held whole, and the stream carries on after it.
    """
    # Bytes, split on b"\n" ourselves: iter_lines waits for a full chunk, and
    # decode_unicode would split JSON strings on U+2028.
    line, discarding = bytearray(), False
    while True:
        before_read()
        try:
            chunk = raw.read1(READ_CHUNK)
        except urllib3.exceptions.ReadTimeoutError:
            return
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            raise EventsUnavailable(f"the {name} stream dropped: {type(exc).__name__}") from exc
        if not chunk:
            return
        touched()
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            if discarding:
                pass
            elif len(line) + end - start > MAX_LINE_BYTES:
                _too_long(name)
            else:
                line += chunk[start:end]
                envelope = _parse(line, name) if line.strip() and not unwanted(line) else None
                if envelope is not None:
                    yield envelope
            discarding, line, start = False, bytearray(), end + 1
        if discarding:
            continue
        if len(line) + len(chunk) - start > MAX_LINE_BYTES:
            _too_long(name)
            discarding, line = True, bytearray()
        else:
            line += chunk[start:]


def _too_long(name: str) -> None:
    log.warning("discarding a line over %d bytes on the %s stream", MAX_LINE_BYTES, name)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _parse(line: bytes, name: str) -> Optional[dict]:
    try:
        # NaN and Infinity are not JSON: passing them on would make our own answers invalid JSON.
        envelope = json.loads(line, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):  # deep nesting too: one bad line must not end the stream
        envelope = None
    if not isinstance(envelope, dict):
        log.warning("ignoring a line that is not a JSON envelope on the %s stream", name)  # pragma: no mutate
        return None
    return envelope


def _check(response: requests.Response, what: str) -> None:
    if response.status_code in (200, 202):
        return
    if 300 <= response.status_code < 400:
        # Followed, a redirect would carry the provider's token and payloads to wherever it points.
        raise EventsUnavailable(f"{what}: the Events API answered {response.status_code}, a redirect, which is "
                                "not followed (set BUS_EVENTS_API_URL to the Events API itself)")
    if 400 <= response.status_code < 500:
        raise EventsRejected(response.status_code, f"{what}: the Events API answered {response.status_code}")
    raise EventsUnavailable(f"{what}: the Events API answered {response.status_code}")
