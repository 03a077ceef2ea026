"""Usage records for runs: none, in memory (local checks), or bus.usage.record over Events."""
import heapq
import itertools
import logging
import threading
import time
from datetime import datetime, timezone

from . import metrics
from .bus import envelope_error
from .bus.client import EventsError
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
    """--usage-backend none: records nothing, publishes nothing. Also the interface of the others."""

    reply_names = ()

    def record(self, event: dict) -> None:
        """Record now, or raise: the run must not start without it."""

    def record_later(self, event: dict) -> None:
        """Record without holding up the caller; failures are retried and logged, never raised."""

    def start(self) -> None:
        """Start background work (in a worker, after fork)."""

    def stop(self) -> None:
        """Stop background work."""


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

    `record` (before a run) raises when the record cannot be made, so the run
    does not start. `record_later` (after a run) hands the record to one
    background sender, which retries a bounded number of times with backoff.
    """

    reply_names = ("bus.usage.record.response",)
    ATTEMPTS = 6
    BACKLOG = 10_000

    def __init__(self, bus, timeout: float, retry_delay: float = 1.0):
        self._bus = bus
        self._timeout = timeout
        self._retry_delay = retry_delay
        self._due = []  # heap of (due time, sequence, attempt, event)
        self._sequence = itertools.count()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = None

    def record(self, event: dict) -> None:
        envelope = self._bus.request(REQUEST, event, self._timeout)
        payload = envelope.get("payload")
        if envelope_error(envelope) is not None or (isinstance(payload, dict) and payload.get("recorded") is False):
            raise Unavailable("the usage record was refused")

    def record_later(self, event: dict) -> None:
        self._schedule(event, attempt=1, delay=0.0)

    def _schedule(self, event: dict, attempt: int, delay: float) -> None:
        with self._wake:
            if len(self._due) >= self.BACKLOG:
                log.error("usage %s for run %s dropped: the backlog is full", event["event_type"], _run(event))
                metrics.usage_lost("backlog_full")
                return
            heapq.heappush(self._due, (time.monotonic() + delay, next(self._sequence), attempt, event))
            metrics.usage_pending(len(self._due))
            self._wake.notify()

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._send_loop, name="usage-sender", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(self._timeout + 5)
            self._thread = None
        for _, _, _, event in self._due:
            log.error("usage %s for run %s not recorded before shutdown", event["event_type"], _run(event))
        metrics.usage_lost("shutdown", len(self._due))
        self._due.clear()
        metrics.usage_pending(0)

    def _next_due(self):
        """The next record whose time has come, or None when stopping."""
        with self._wake:
            while not self._stopping:
                wait = self._due[0][0] - time.monotonic() if self._due else None
                if wait is not None and wait <= 0:
                    metrics.usage_pending(len(self._due) - 1)
                    return heapq.heappop(self._due)
                self._wake.wait(wait)
        return None

    def _send_loop(self) -> None:
        while (item := self._next_due()) is not None:
            _, _, attempt, event = item
            try:
                self.record(event)
            except (ProviderError, EventsError) as exc:
                if attempt >= self.ATTEMPTS:
                    log.error("usage %s for run %s lost after %d attempts (%s)",
                              event["event_type"], _run(event), attempt, exc)
                    metrics.usage_lost("attempts")
                    continue
                log.warning("usage %s for run %s not recorded (%s); retrying",
                            event["event_type"], _run(event), exc)
                self._schedule(event, attempt + 1, self._retry_delay * 2 ** (attempt - 1))
            except Exception:  # a bug must not end the sender silently
                log.exception("usage %s for run %s failed", event["event_type"], _run(event))


def _run(event: dict) -> str:
    return event["data"]["run_id"]
