"""One background thread per reply name: reads its stream and feeds the waiter registry."""
import logging
import threading
import time

import requests

from .. import metrics
from .client import EventsClient, EventsError, EventsRejected

log = logging.getLogger(__name__)


class Listener(threading.Thread):
    """Keeps one broadcast stream open for `reply_name`, reconnecting as configured.

    An idle or cleanly ended stream is reopened at once. A failure to connect
    is retried with exponential backoff only when `retry` is set; otherwise the
    listener stays down. Either way, once it has been down for `down_grace`
    seconds the requests waiting on it fail instead of waiting out their timeout.
    """

    def __init__(self, client: EventsClient, reply_name: str, registry, *, retry: bool,
                 retry_min: float, retry_max: float, down_grace: float, idle_timeout: float):
        super().__init__(name=f"listener:{reply_name}", daemon=True)
        self.reply_name = reply_name
        self._client = client
        self._registry = registry
        self._retry = retry
        self._retry_min, self._retry_max = retry_min, retry_max
        self._down_grace = down_grace
        self._idle_timeout = idle_timeout
        self._stopping = threading.Event()
        self._connected = threading.Event()
        self._raw = None
        self._grace_timer = None
        # Connected state, the registry's up/down mark and the grace timer change together.
        self._state_lock = threading.RLock()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def start(self) -> None:
        metrics.listener_state(self.reply_name, False)
        self._went_down("not connected yet")
        super().start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        raw = self._raw
        if raw is not None:
            try:
                raw.shutdown()  # wakes a read blocked on a silent stream
            except (ValueError, RuntimeError, OSError):
                pass
        self._cancel_grace()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)

    def run(self) -> None:
        delay = self._retry_min
        with requests.Session() as session:
            while not self._stopping.is_set():
                opened = time.monotonic()
                reason = self._listen(session)
                if reason is None and time.monotonic() - opened >= self._retry_min:
                    delay = self._retry_min  # a stream that lived ended quietly: reopen it at once
                    continue
                if reason is not None and not self._retry:
                    log.error("the %s listener stays down (BUS_EVENTS_LISTENER_RETRY is not set)",
                              self.reply_name)
                    with self._state_lock:
                        self._cancel_grace()
                        self._registry.mark_down(self.reply_name, reason)
                    return
                # A failure, or a stream that ends as soon as it opens: back off.
                metrics.listener_reconnected(self.reply_name)
                self._stopping.wait(delay)
                delay = min(delay * 2, self._retry_max)

    def _listen(self, session):
        """Read one stream to its end; the reason it failed, or None for a quiet end."""
        try:
            for envelope in self._client.stream(self.reply_name, self._idle_timeout, self._opened,
                                                session=session):
                self._registry.resolve(self.reply_name, envelope)
            return None
        except EventsRejected as exc:
            if exc.unauthorized:
                log.error("the Events API refused the provider's token for %s (HTTP %d)",
                          self.reply_name, exc.status)
            else:
                log.error("%s", exc)
            return str(exc)
        except EventsError as exc:
            if not self._stopping.is_set():
                log.warning("%s", exc)
            return str(exc)
        except Exception:  # a bug must not end the listener silently
            log.exception("the %s listener failed", self.reply_name)
            return "unexpected error"
        finally:
            self._raw = None
            with self._state_lock:
                if self._connected.is_set():
                    self._connected.clear()
                    metrics.listener_state(self.reply_name, False)
                    self._went_down("stream ended")

    def _opened(self, raw) -> None:
        self._raw = raw
        with self._state_lock:
            self._cancel_grace()
            self._registry.mark_up(self.reply_name)
            self._connected.set()
        metrics.listener_state(self.reply_name, True)
        log.info("listening for %s", self.reply_name)

    def _went_down(self, reason: str) -> None:
        with self._state_lock:
            self._cancel_grace()
            if self._stopping.is_set():
                return
            self._grace_timer = threading.Timer(self._down_grace, self._grace_over, args=(reason,))
            self._grace_timer.daemon = True
            self._grace_timer.start()

    def _grace_over(self, reason: str) -> None:
        with self._state_lock:
            if not self.connected and not self._stopping.is_set():
                self._registry.mark_down(self.reply_name, reason)

    def _cancel_grace(self) -> None:
        with self._state_lock:
            timer, self._grace_timer = self._grace_timer, None
        if timer is not None:
            timer.cancel()
