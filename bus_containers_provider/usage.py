"""Usage records for runs: none, in memory (local checks), or bus.usage.record over Events."""
import logging
import queue
import threading
import time
from datetime import datetime, timezone

from .errors import ProviderError, Unavailable

log = logging.getLogger(__name__)

REQUEST = "bus.usage.record.request"
REQUESTED, FINISHED, FAILED = "container_run_requested", "container_run_finished", "container_run_failed"


def usage_event(event_type: str, run, data: dict) -> dict:
    """A usage record; event_id is stable per run and type, so a re-delivery never counts twice."""
    return {
        "event_type": event_type,
        "event_id": f"{run.run_id}:{event_type}",
        "account_id": run.owner_account_id,
        "occurred_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "data": {"run_id": run.run_id, "image": run.image_label, **data},
    }


class NoUsage:
    """--usage-backend none: records nothing, publishes nothing."""

    reply_names = ()

    def record(self, event: dict) -> None:
        return None

    def record_later(self, event: dict) -> None:
        return None

    def start(self) -> None:
        return None

    def stop(self) -> None:
        return None


class MemoryUsage(NoUsage):
    """--usage-backend memory: records stay in this process, keyed by event_id."""

    def __init__(self):
        self._lock = threading.Lock()
        self._records = {}

    @property
    def records(self) -> list:
        with self._lock:
            return list(self._records.values())

    def record(self, event: dict) -> None:
        with self._lock:
            self._records.setdefault(event["event_id"], event)

    record_later = record


class EventsUsage(NoUsage):
    """--usage-backend events: each record waits for bus-integration-usage to confirm it.

    A record that must precede a run (record) fails the run when it cannot be
    made. A record after the run (record_later) never costs the caller the
    result: it is retried in the background, a bounded number of times.
    """

    reply_names = ("bus.usage.record.response",)
    RETRIES = 5
    BACKLOG = 10_000

    def __init__(self, bus, timeout: float, retry_delay: float = 1.0):
        self._bus = bus
        self._timeout = timeout
        self._retry_delay = retry_delay
        self._backlog = queue.Queue(self.BACKLOG)
        self._stopping = threading.Event()
        self._thread = None

    def record(self, event: dict) -> None:
        envelope = self._bus.request(REQUEST, event, self._timeout)
        payload = envelope.get("payload")
        if envelope.get("error") is not None or (isinstance(payload, dict) and payload.get("recorded") is False):
            raise Unavailable("the usage record was refused")

    def record_later(self, event: dict) -> None:
        try:
            self.record(event)
        except ProviderError as exc:
            log.warning("usage %s for %s not recorded (%s); retrying in the background",
                        event["event_type"], event["data"]["run_id"], exc.message)
            self._enqueue(event, attempt=1)

    def _enqueue(self, event: dict, attempt: int) -> None:
        due = time.monotonic() + self._retry_delay * 2 ** (attempt - 1)
        try:
            self._backlog.put_nowait((due, event, attempt))
        except queue.Full:
            log.error("usage %s for %s dropped: the retry backlog is full",
                      event["event_type"], event["data"]["run_id"])

    def start(self) -> None:
        self._stopping.clear()
        self._thread = threading.Thread(target=self._retry_loop, name="usage-retry", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        while not self._backlog.empty():
            _, event, _ = self._backlog.get_nowait()
            log.error("usage %s for %s not recorded before shutdown", event["event_type"], event["data"]["run_id"])

    def _retry_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                due, event, attempt = self._backlog.get(timeout=0.5)
            except queue.Empty:
                continue
            # Items arrive roughly in due order, so waiting for the head is enough.
            if self._stopping.wait(max(0.0, due - time.monotonic())):
                self._backlog.put_nowait((due, event, attempt))
                return
            try:
                self.record(event)
                log.info("usage %s for %s recorded on retry %d",
                         event["event_type"], event["data"]["run_id"], attempt)
            except ProviderError as exc:
                if attempt >= self.RETRIES:
                    log.error("usage %s for %s lost after %d retries (%s)",
                              event["event_type"], event["data"]["run_id"], attempt, exc.message)
                else:
                    self._enqueue(event, attempt + 1)
