"""Request/reply over the Bus Events API: publish a request, wait for its correlated reply."""
import logging
import time
import uuid
from typing import Callable, Dict, Optional, Tuple

from .. import metrics
from ..credentials import events_token
from ..errors import BadGateway, ProviderError, Unavailable
from ..logs import backend_timer
from .client import EventsClient, EventsError, EventsRejected, ListenerDown, ReplyTimeout
from .listener import Listener
from .replies import ReplyRegistry, Waiter

log = logging.getLogger(__name__)


def reply_name_for(request_name: str) -> str:
    return request_name[: -len(".request")] + ".response"


def envelope_error(envelope: dict) -> Optional[Tuple[Optional[str], Optional[str]]]:
    """(type, message) of a reply envelope's error, or None; `code` is read as `type`, non-strings as absent."""
    error = envelope.get("error")
    if error is None:
        return None
    if not isinstance(error, dict):
        return None, None
    kind, message = error.get("type", error.get("code")), error.get("message")
    return (kind if isinstance(kind, str) else None), (message if isinstance(message, str) else None)


def as_http(exc: EventsError) -> ProviderError:
    """The answer for a failure to use the Events API: the client's errors stop at this boundary."""
    if isinstance(exc, EventsRejected) and exc.malformed:
        return BadGateway("the Events API refused the request as malformed")  # pragma: no mutate
    if isinstance(exc, EventsRejected) and exc.unauthorized:
        return Unavailable("the Events API refused the provider's credentials")  # pragma: no mutate
    return Unavailable(str(exc))  # pragma: no mutate


class Bus:
    """One process's side of the Events API: a listener per reply name and one waiter registry.

    Failures are raised as ProviderErrors (502/503, see `as_http`): nothing
    above this package sees the Events client's own errors.
    """

    def __init__(self, settings, client: EventsClient = None):
        self._settings = settings
        self._reply_names = set()
        self.client = client or EventsClient(settings.events_url, events_token(settings),
                                             publish_timeout=settings.request_timeout)
        self.registry = ReplyRegistry()
        self._listeners: Dict[str, Listener] = {}

    def listen_for(self, *reply_names: str) -> None:
        """Name the reply streams start() opens; before start only."""
        self._reply_names.update(reply_names)

    def start(self) -> None:
        """Open the reply streams; called in each worker after fork, never at import."""
        if self._listeners:
            return
        s = self._settings
        for name in sorted(self._reply_names):
            self._listeners[name] = Listener(
                self.client, name, self.registry, retry=s.listener_retry, retry_min=s.listener_retry_min,
                retry_max=s.listener_retry_max, down_grace=s.listener_down_grace,
                idle_timeout=s.listener_idle_timeout)
            self._listeners[name].start()

    def stop(self) -> None:
        listeners, self._listeners = self._listeners, {}
        for listener in listeners.values():
            listener.stop()
        self.client.close()

    def disconnected(self) -> list:
        if not self._listeners:
            return sorted(self._reply_names)
        return [name for name, listener in sorted(self._listeners.items()) if not listener.connected]

    def wait_connected(self, timeout: float) -> bool:
        return all(listener.wait_connected(timeout) for listener in self._listeners.values())

    def request(self, request_name: str, payload: dict, timeout: float) -> dict:
        """Publish `request_name` and return its reply envelope, waiting at most `timeout` seconds."""
        with backend_timer():
            correlation_id = str(uuid.uuid4())
            waiter = self.expect(request_name, correlation_id)
            try:
                started = time.perf_counter()
                self.publish(request_name, correlation_id, payload)
                try:
                    envelope = waiter.wait(timeout)
                except ReplyTimeout as exc:
                    metrics.reply_timed_out(waiter.reply_name)
                    raise as_http(exc) from None
                except EventsError as exc:
                    raise as_http(exc) from None
                # §8: from before the publish to the reply (the worker may answer before the publish returns).
                metrics.reply_seconds(waiter.reply_name, time.perf_counter() - started)
                return envelope
            finally:
                self.registry.discard(waiter)

    def expect(self, request_name: str, correlation_id: str,
               on_reply: Optional[Callable[[Optional[dict], Optional[Exception]], None]] = None) -> Waiter:
        """Register for the reply to `correlation_id`, before its request is published.

        With `on_reply`, no thread waits: it is called once, with the reply
        envelope or the error that ended the wait. Refused (503) while the
        reply stream is not open: a reply published now would be lost.
        """
        reply_name = reply_name_for(request_name)
        listener = self._listeners.get(reply_name)
        # A stream already past its down grace is refused at once, not after another grace.
        if listener is None or self.registry.is_down(reply_name) \
                or not listener.wait_connected(self._settings.listener_down_grace):
            raise as_http(ListenerDown(f"the {reply_name} listener is not connected"))
        try:
            return self.registry.register(reply_name, correlation_id, on_reply)
        except ListenerDown as exc:
            raise as_http(exc) from None

    def publish(self, request_name: str, correlation_id: str, payload: dict) -> None:
        try:
            self.client.publish(request_name, correlation_id, payload)
        except EventsRejected as exc:
            if exc.unauthorized:
                log.error("the Events API refused the provider's token for %s (HTTP %d)", request_name, exc.status)
            else:
                log.error("%s", exc)  # pragma: no mutate
            raise as_http(exc) from None
        except EventsError as exc:
            log.warning("%s", exc)  # pragma: no mutate
            raise as_http(exc) from None

    def notify(self, request_name: str, payload: dict) -> None:
        """Publish without waiting for a reply (its reply, if any, finds no waiter and is dropped)."""
        self.publish(request_name, str(uuid.uuid4()), payload)

    def recover(self, request_name: str, correlation_ids) -> None:
        """Look for replies to `correlation_ids` in the stored history (their waiters registered first).

        A request published by a process that died may have been answered while
        no stream of ours was open; the history read runs in the background.
        """
        listener = self._listeners.get(reply_name_for(request_name))
        if listener is not None:
            listener.catch_up_later(set(correlation_ids))

    def forget(self, waiter: Waiter) -> None:
        """End a wait registered with `expect` (every path ends it)."""
        self.registry.discard(waiter)
