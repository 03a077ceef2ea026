"""Request/reply over the Bus Events API: publish a request, wait for its correlated reply."""
import logging
import uuid
from typing import List

from ..errors import BadGateway, Unavailable
from ..logs import backend_timer
from .client import EventsClient, EventsRejected, EventsUnavailable
from .listener import Listener
from .replies import ReplyRegistry

log = logging.getLogger(__name__)

# An idle reply stream is reopened after this long; the API sends no heartbeat.
STREAM_IDLE_TIMEOUT = 60.0


def reply_name_for(request_name: str) -> str:
    return request_name[: -len(".request")] + ".response"


class Bus:
    """One process's side of the Events API: a listener per reply name and one waiter registry."""

    def __init__(self, settings, client: EventsClient = None):
        self._settings = settings
        self._reply_names = []
        self.client = client or EventsClient(settings.events_url, settings.api_token,
                                             publish_timeout=settings.request_timeout)
        self.registry = ReplyRegistry()
        self._listeners: List[Listener] = []

    def listen_for(self, *reply_names: str) -> None:
        """Name the reply streams start() opens; before start only."""
        self._reply_names = sorted(set(self._reply_names) | set(reply_names))

    def start(self) -> None:
        """Open the reply streams; called in each worker after fork, never at import."""
        if self._listeners:
            return
        s = self._settings
        for name in self._reply_names:
            listener = Listener(self.client, name, self.registry, retry=s.listener_retry,
                                retry_min=s.listener_retry_min, retry_max=s.listener_retry_max,
                                down_grace=s.listener_down_grace, idle_timeout=STREAM_IDLE_TIMEOUT)
            listener.start()
            self._listeners.append(listener)

    def stop(self) -> None:
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            listener.stop()
        self.client.close()

    def disconnected(self) -> List[str]:
        if not self._listeners:
            return list(self._reply_names)
        return [listener.reply_name for listener in self._listeners if not listener.connected]

    def wait_connected(self, timeout: float) -> bool:
        return all(listener.wait_connected(timeout) for listener in self._listeners)

    def request(self, request_name: str, payload: dict, timeout: float) -> dict:
        """Publish `request_name` and return its reply envelope, or raise Unavailable/BadGateway."""
        with backend_timer():
            return self._request(request_name, payload, timeout)

    def _request(self, request_name: str, payload: dict, timeout: float) -> dict:
        correlation_id = str(uuid.uuid4())
        waiter = self.registry.register(reply_name_for(request_name), correlation_id)
        try:
            try:
                self.client.publish(request_name, correlation_id, payload)
            except EventsRejected as exc:
                log.error("%s", exc)
                if exc.unauthorized:
                    raise Unavailable("the Events API refused the provider's credentials") from None
                raise BadGateway("the Events API refused the request as malformed") from None
            except EventsUnavailable as exc:
                log.warning("%s", exc)
                raise Unavailable("the Events API is unreachable") from None
            return waiter.wait(timeout)
        finally:
            self.registry.discard(waiter)
