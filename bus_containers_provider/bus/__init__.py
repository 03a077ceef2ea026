"""Request/reply over the Bus Events API: publish a request, wait for its correlated reply."""
import logging
import time
import uuid
from typing import Callable, Dict, Optional, Tuple

from .. import metrics
from ..credentials import events_token
from ..logs import backend_timer
from .client import EventsClient, EventsError, EventsRejected, ListenerDown
from .listener import Listener
from .replies import ReplyRegistry

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


class Bus:
    """One process's side of the Events API: a listener per reply name and one waiter registry.

    Failures are raised as the client's EventsError tree; the app's error
    handler turns them into 502/503.
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

    def request(self, request_name: str, payload: dict, timeout: float, *,
                published: Optional[Callable[[], None]] = None,
                cancelled: Optional[Callable[[], Optional[str]]] = None) -> dict:
        """Publish `request_name` and return its reply envelope.

        `published` is called once the Events API has accepted the request;
        `cancelled` is asked while waiting, and a reason it returns ends the
        wait with RunCancelled.
        """
        with backend_timer():
            return self._request(request_name, payload, timeout, published, cancelled)

    def notify(self, request_name: str, payload: dict) -> None:
        """Publish without waiting for a reply (its reply, if any, finds no waiter and is dropped)."""
        self.client.publish(request_name, str(uuid.uuid4()), payload)

    def _request(self, request_name: str, payload: dict, timeout: float, published=None, cancelled=None) -> dict:
        reply_name = reply_name_for(request_name)
        listener = self._listeners.get(reply_name)
        # Never publish while the reply stream is closed (start-up, a reconnect):
        # the reply would be lost and the caller would wait out the whole timeout.
        # A stream already past its down grace is refused at once, not after another grace.
        if listener is None or self.registry.is_down(reply_name) \
                or not listener.wait_connected(self._settings.listener_down_grace):
            raise ListenerDown(f"the {reply_name} listener is not connected")
        correlation_id = str(uuid.uuid4())
        waiter = self.registry.register(reply_name, correlation_id)
        try:
            started = time.perf_counter()
            try:
                self.client.publish(request_name, correlation_id, payload)
            except EventsRejected as exc:
                if exc.unauthorized:
                    log.error("the Events API refused the provider's token for %s (HTTP %d)", request_name, exc.status)
                else:
                    log.error("%s", exc)  # pragma: no mutate
                raise
            except EventsError as exc:
                log.warning("%s", exc)  # pragma: no mutate
                raise
            if published is not None:
                published()
            with metrics.reply_timer(reply_name, started):  # §8: from the publish to the reply
                return waiter.wait(timeout, cancelled)
        finally:
            self.registry.discard(waiter)
