"""Usage records for runs: none, in memory (local checks), or bus.usage.record over Events."""
import heapq
import itertools
import logging
import threading
import time
from datetime import datetime, timezone

from . import metrics
from .bus import envelope_error
from .errors import ProviderError, StateUnavailable, Unavailable

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
    # False: the run flow builds no records for this backend at all.
    keeps_records = False

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

    keeps_records = True

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
    does not start. `record_later` (after a run) hands the record to a small
    pool of background senders, so one record whose reply is slow holds one
    sender, not the others; each record is retried a bounded number of times
    with backoff. `stop` keeps sending for up to `flush_timeout` seconds, so
    what is pending at shutdown is still recorded.

    With an `outbox` (the shared state store, --state-url) every pending record
    is also kept there until it is confirmed, under a lease this process
    renews; a record whose holder died or gave up is taken and sent by
    whichever process asks next, so a killed process loses none. A record may
    then be sent twice, always with the same event_id, which the usage
    service counts once.
    """

    reply_names = ("bus.usage.record.response",)
    keeps_records = True
    ATTEMPTS = 6
    BACKLOG = 10_000
    SENDERS = 8
    IDLE_WAIT = 60.0
    # While flushing, a refused record is tried again after at most this long.
    FLUSH_RETRY_DELAY = 0.5
    # Another process takes over a record once its holder has not renewed it for this long.
    OUTBOX_LEASE = 10.0
    # How often held records are renewed and abandoned ones taken.
    OUTBOX_EVERY = 3.0

    def __init__(self, bus, timeout: float, retry_delay: float = 1.0, *, senders: int = SENDERS,
                 flush_timeout: float = None, outbox=None):
        self._bus = bus
        self._timeout = timeout
        self._retry_delay = retry_delay
        self._senders = senders
        self._flush_timeout = timeout + 5 if flush_timeout is None else flush_timeout
        self._due = []  # heap of (due time, sequence, attempt, event)
        self._sending = {}  # event_id -> event, while a sender waits for its confirmation
        self._sequence = itertools.count()
        self._wake = threading.Condition()
        self._flush_by = None  # monotonic deadline once stop() began
        self._threads = []
        self._outbox = outbox
        self._kept = set()  # event_ids the outbox holds for us
        self._keeper_stop = threading.Event()

    def record(self, event: dict, timeout: float = None) -> None:
        envelope = self._bus.request(REQUEST, event, self._timeout if timeout is None else timeout)
        payload = envelope.get("payload")
        if envelope_error(envelope) is not None or (isinstance(payload, dict) and payload.get("recorded") is False):
            raise Unavailable("the usage record was refused")  # pragma: no mutate

    def record_later(self, event: dict) -> None:
        self._keep(event)
        self._schedule(event, attempt=1, delay=0.0)

    def _keep(self, event: dict) -> None:
        if self._outbox is None:
            return
        try:
            self._outbox.outbox_put(event["event_id"], event, self.OUTBOX_LEASE)
        except StateUnavailable:
            # pragma: no mutate start (log text)
            log.warning("usage %s for run %s is kept in this process only: the state store is unreachable",
                        event["event_type"], _run(event))
            # pragma: no mutate end
            return
        with self._wake:
            self._kept.add(event["event_id"])

    def _confirmed(self, event: dict) -> None:
        if self._outbox is None:
            return
        with self._wake:
            self._kept.discard(event["event_id"])
        try:
            self._outbox.outbox_done(event["event_id"])
        except StateUnavailable:
            # It will be sent once more, by whoever takes it: same event_id, counted once.
            # pragma: no mutate start (log text)
            log.warning("usage %s for run %s stays in the outbox: the state store is unreachable",
                        event["event_type"], _run(event))
            # pragma: no mutate end

    def _schedule(self, event: dict, attempt: int, delay: float) -> None:
        with self._wake:
            if len(self._due) >= self.BACKLOG:
                log.error("usage %s for run %s dropped: the backlog is full", event["event_type"], _run(event))  # pragma: no mutate
                metrics.usage_lost("backlog_full")
                return
            if self._flush_by is not None:
                delay = min(delay, self.FLUSH_RETRY_DELAY)
            heapq.heappush(self._due, (time.monotonic() + delay, next(self._sequence), attempt, event))
            metrics.usage_pending(len(self._due) + len(self._sending))
            self._wake.notify()

    def start(self) -> None:
        with self._wake:
            self._flush_by = None
        self._threads = [threading.Thread(target=self._send_loop, name=f"usage-sender-{n}", daemon=True)
                         for n in range(self._senders)]
        for thread in self._threads:
            thread.start()
        if self._outbox is not None:
            self._keeper_stop.clear()
            self._threads.append(threading.Thread(target=self._keep_loop, name="usage-outbox", daemon=True))
            self._threads[-1].start()

    def stop(self) -> None:
        """Send what is pending for up to `flush_timeout` seconds, then give up on the rest, loudly."""
        with self._wake:
            self._flush_by = time.monotonic() + self._flush_timeout
            # Records waiting out a retry backoff are due now: there is no later.
            self._due = [(0.0, seq, attempt, event) for _, seq, attempt, event in self._due]
            heapq.heapify(self._due)
            self._wake.notify_all()
        senders, keeper = self._threads[:self._senders], self._threads[self._senders:]
        for thread in senders:
            thread.join(max(0.0, self._flush_by - time.monotonic()) + 1.0)
        self._keeper_stop.set()
        for thread in keeper:
            thread.join(5)
        self._threads = []
        with self._wake:
            left = [event for *_, event in self._due] + list(self._sending.values())
            self._due.clear()
            kept = self._kept
        metrics.usage_lost("shutdown", sum(event["event_id"] not in kept for event in left))
        metrics.usage_pending(0)
        for event in left:
            if event["event_id"] in kept:
                # pragma: no mutate start (log text)
                log.warning("usage %s for run %s left in the shared outbox for another process",
                            event["event_type"], _run(event))
                # pragma: no mutate end
            else:
                log.error("usage %s for run %s not recorded before shutdown", event["event_type"], _run(event))  # pragma: no mutate

    def _next_due(self):
        """The next record whose time has come; None once flushing is over."""
        with self._wake:
            while True:
                now = time.monotonic()
                if self._flush_by is not None and (now >= self._flush_by or not self._due):
                    return None
                wait = self._due[0][0] - now if self._due else None
                if wait is not None and wait <= 0:
                    item = heapq.heappop(self._due)
                    self._sending[item[3]["event_id"]] = item[3]
                    return item
                if self._flush_by is not None:
                    wait = min(wait, self._flush_by - now)
                # Every wait is bounded; a new record or stop() wakes it sooner.
                self._wake.wait(self.IDLE_WAIT if wait is None else wait)

    def _send_timeout(self) -> float:
        with self._wake:
            if self._flush_by is None:
                return self._timeout
            return max(0.1, min(self._timeout, self._flush_by - time.monotonic()))

    def _send_loop(self) -> None:
        while (item := self._next_due()) is not None:
            _, _, attempt, event = item
            error = None
            try:
                self.record(event, self._send_timeout())
            except ProviderError as exc:
                error = exc
            except Exception:  # a bug must not end the sender silently
                log.exception("usage %s for run %s failed", event["event_type"], _run(event))  # pragma: no mutate
            with self._wake:
                self._sending.pop(event["event_id"], None)
                kept = event["event_id"] in self._kept
                metrics.usage_pending(len(self._due) + len(self._sending))
            if error is None:
                self._confirmed(event)
                continue
            if attempt >= self.ATTEMPTS and kept:
                # No longer renewed: once its lease passes, any process (this one too) takes it again.
                with self._wake:
                    self._kept.discard(event["event_id"])
                # pragma: no mutate start (log text)
                log.error("usage %s for run %s not recorded after %d attempts (%s); left in the outbox",
                          event["event_type"], _run(event), attempt, error)
                # pragma: no mutate end
            elif attempt >= self.ATTEMPTS:
                # pragma: no mutate start (log text)
                log.error("usage %s for run %s lost after %d attempts (%s)",
                          event["event_type"], _run(event), attempt, error)
                # pragma: no mutate end
                metrics.usage_lost("attempts")
            else:
                log.warning("usage %s for run %s not recorded (%s); retrying", event["event_type"], _run(event), error)  # pragma: no mutate
                self._schedule(event, attempt + 1, self._retry_delay * 2 ** (attempt - 1))

    def _keep_loop(self) -> None:
        """Renew the leases on what this process holds; take what nobody holds any more."""
        while not self._keeper_stop.wait(self.OUTBOX_EVERY):
            with self._wake:
                held = self._kept & ({event["event_id"] for *_, event in self._due} | set(self._sending))
                flushing = self._flush_by is not None
            try:
                self._outbox.outbox_hold(held, self.OUTBOX_LEASE)
                taken = [] if flushing else self._outbox.outbox_take(self.SENDERS * 4, self.OUTBOX_LEASE)
            except StateUnavailable:
                continue  # the store logged it; what we hold is still sent from here
            for event in taken:
                with self._wake:
                    if event["event_id"] in self._kept:
                        continue  # ours already: our lease lapsed while the store was away
                    self._kept.add(event["event_id"])
                log.info("usage %s for run %s taken from the outbox", event["event_type"], _run(event))  # pragma: no mutate
                self._schedule(event, attempt=1, delay=0.0)


def _run(event: dict) -> str:
    return event["data"]["run_id"]
