"""Correlation id -> waiter: the one place replies meet the requests that wait for them."""
import logging
import re
import threading
import time
from collections import OrderedDict
from typing import Callable, Dict, Optional

from ..errors import RunCancelled
from .client import ListenerDown, ReplyTimeout

log = logging.getLogger(__name__)

# How often a wait asks whether it was cancelled (a caller gone is noticed within this).
CANCEL_POLL_SECONDS = 0.5
# Correlation ids remembered after their wait ended, so a second copy of a reply
# (two streams during a reopen, a catch-up replay, a worker's retried publish)
# is told apart from a reply that came too late. Oldest are forgotten first.
REMEMBERED = 20_000
ANSWERED, EXPIRED = "answered", "expired"
# A correlation id key with a plain string value, wherever it is in a line; a value with an escape ends at "\".
_CORRELATION = re.compile(rb'"correlation(?:Id|_id)"\s*:\s*"([^"\\]*)(["\\])')


class CancelWatch:
    """One thread asks every waiting request's `cancelled` in turn, every CANCEL_POLL_SECONDS.

    Each waiting thread used to wake every half second to ask for itself: at
    thousands of runs in flight that was thousands of wake-ups a second, each
    taking the GIL from the threads doing real work. The thread runs only
    while something is watched (it starts with the first waiter and ends with
    the last), so it always starts after fork, in a worker.
    """

    def __init__(self, every: float = CANCEL_POLL_SECONDS):
        self._every = every
        self._lock = threading.Lock()
        self._watched = {}  # Waiter -> its `cancelled`
        self._thread = None

    def add(self, waiter: "Waiter", cancelled: Callable[[], Optional[str]]) -> None:
        with self._lock:
            self._watched[waiter] = cancelled
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="cancel-watch", daemon=True)
                self._thread.start()

    def remove(self, waiter: "Waiter") -> None:
        with self._lock:
            self._watched.pop(waiter, None)

    def _run(self) -> None:
        while True:
            time.sleep(self._every)
            with self._lock:
                if not self._watched:
                    self._thread = None
                    return
                watched = list(self._watched.items())
            for waiter, cancelled in watched:
                try:
                    reason = cancelled()
                except Exception:  # one broken check must not stop the others' cancellation
                    log.exception("checking whether a run was cancelled failed")
                    continue
                if reason:
                    waiter._complete(error=RunCancelled(reason))


class Waiter:
    """One request's wait for its reply; completed at most once."""

    __slots__ = ("reply_name", "correlation_id", "_done", "_envelope", "_error", "_watch", "_lock", "_on_reply")

    def __init__(self, reply_name: str, correlation_id: str, watch: Optional[CancelWatch] = None,
                 on_reply: Optional[Callable[[Optional[dict], Optional[Exception]], None]] = None):
        self.reply_name = reply_name
        self.correlation_id = correlation_id
        self._done = threading.Event()
        self._envelope = None
        self._error = None
        self._watch = watch
        self._on_reply = on_reply
        # The listener (a reply) and the cancel watch (a caller gone) may complete it at once: the first wins.
        self._lock = threading.Lock()

    def _complete(self, envelope=None, error=None) -> bool:
        with self._lock:
            if self._done.is_set():
                return False
            self._envelope, self._error = envelope, error
            self._done.set()
        if self._on_reply is not None:
            try:
                self._on_reply(envelope, error)
            except Exception:  # the listener thread calling it must carry on with the other replies
                log.exception("handling the %s reply for %s failed", self.reply_name, self.correlation_id)
        return True

    def watch(self, cancelled: Callable[[], Optional[str]]) -> None:
        """Complete with RunCancelled once `cancelled` returns a reason (asked by the CancelWatch)."""
        self._watch.add(self, cancelled)

    def unwatch(self) -> None:
        self._watch.remove(self)

    @property
    def answered(self) -> bool:
        return self._done.is_set() and self._error is None

    def wait(self, timeout: float, cancelled: Optional[Callable[[], Optional[str]]] = None) -> dict:
        """The reply envelope; ReplyTimeout when none came within `timeout` seconds.

        With `cancelled`, the wait ends with RunCancelled within about
        CANCEL_POLL_SECONDS of it returning a reason (asked by the CancelWatch).
        """
        if cancelled is None:
            done = self._done.wait(timeout)
        else:
            watch = self._watch or CancelWatch()
            watch.add(self, cancelled)
            try:
                done = self._done.wait(timeout)
            finally:
                watch.remove(self)
        if not done:
            raise ReplyTimeout(f"no {self.reply_name} reply within {timeout:g}s")
        if self._error is not None:
            raise self._error
        return self._envelope


class ReplyRegistry:
    """Thread-safe map of pending waiters for one provider process.

    The first reply for a correlation id wins; later copies are dropped
    silently, and a reply whose waiter already gave up is logged once.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._waiters: Dict[str, Waiter] = {}
        self._down: Dict[str, str] = {}
        self._ended: "OrderedDict[str, str]" = OrderedDict()  # correlation id -> ANSWERED | EXPIRED
        self._watch = CancelWatch()
        self._counts: Dict[str, int] = {}  # reply name -> waiters pending on it
        self._wanted: Dict[str, threading.Event] = {}  # reply name -> set while any waiter is pending

    def register(self, reply_name: str, correlation_id: str, on_reply=None) -> Waiter:
        """Add a waiter (before publishing, so a fast reply finds it); refuse while the reply stream is down.

        With `on_reply(envelope, error)` nobody needs to wait: it is called once, by whatever completes it.
        """
        waiter = Waiter(reply_name, correlation_id, self._watch, on_reply)
        with self._lock:
            reason = self._down.get(reply_name)
            if reason is None:
                self._waiters[correlation_id] = waiter
                first = self._count(reply_name, 1) == 1
                wanted = self._wanted_event(reply_name) if first else None
        if reason is not None:
            raise ListenerDown(f"the {reply_name} listener is not connected ({reason})")
        if first and not wanted.is_set():
            wanted.set()  # a stream read in batches is read at once again, before the request is published
        return waiter

    def _count(self, reply_name: str, change: int) -> int:
        count = self._counts[reply_name] = self._counts.get(reply_name, 0) + change
        return count

    def _wanted_event(self, reply_name: str) -> threading.Event:
        wanted = self._wanted.get(reply_name)
        if wanted is None:
            wanted = self._wanted[reply_name] = threading.Event()
        return wanted

    def wake(self, reply_name: str) -> None:
        """End every until_wanted on `reply_name` now (a reader being closed must not sleep out its batch)."""
        with self._lock:
            wanted = self._wanted_event(reply_name)
        wanted.set()

    def until_wanted(self, reply_name: str, timeout: float) -> None:
        """Return at once while a waiter on `reply_name` is pending; else when one registers, or after `timeout`."""
        with self._lock:
            if self._counts.get(reply_name):
                return
            wanted = self._wanted_event(reply_name)
            wanted.clear()
        wanted.wait(timeout)

    def discard(self, waiter: Waiter) -> None:
        """End a wait on every path; one that ended without its reply is remembered as expired."""
        with self._lock:
            if self._waiters.get(waiter.correlation_id) is waiter:
                del self._waiters[waiter.correlation_id]
                self._count(waiter.reply_name, -1)
                self._remember(waiter.correlation_id, ANSWERED if waiter.answered else EXPIRED)

    def resolve(self, reply_name: str, envelope: dict) -> bool:
        """Hand a reply to its waiter; unknown, duplicate, late and other processes' replies are dropped."""
        correlation_id = envelope.get("correlationId", envelope.get("correlation_id"))
        if not isinstance(correlation_id, str):
            return False
        with self._lock:
            waiter = self._waiters.get(correlation_id)
            if waiter is None or waiter.reply_name != reply_name:
                late = self._ended.get(correlation_id) == EXPIRED
                if late:
                    self._remember(correlation_id, ANSWERED)  # log a late reply once, not per copy
            else:
                del self._waiters[correlation_id]
                self._count(reply_name, -1)
                self._remember(correlation_id, ANSWERED)
        if waiter is None or waiter.reply_name != reply_name:
            if late:
                # The caller was already answered (timeout, cancel): nothing of this reply reaches it.
                log.info("late %s reply for correlation id %s: its request no longer waits",
                         reply_name, correlation_id)
            return False
        waiter._complete(envelope=envelope)
        return True

    def unwanted(self, line: bytes) -> bool:
        """True only when a raw reply line is certainly for nobody here, so it need not be parsed.

        Every provider process reads every reply on the shared streams; most
        are another's. Each occurrence of the key counts (one nested in a
        payload may come first); an escaped value, a \\u escape anywhere (a key
        could be spelt with one), a key with no plain string value, or an id
        whose late reply is still to be logged means "parse it".
        """
        if b"\\u" in line:
            return False
        found = False
        with self._lock:
            for match in _CORRELATION.finditer(line):
                if match.group(2) == b"\\":
                    return False
                try:
                    correlation_id = match.group(1).decode("utf-8")
                except UnicodeDecodeError:
                    return False  # not JSON: the parse says so in the log
                if correlation_id in self._waiters or self._ended.get(correlation_id) == EXPIRED:
                    return False
                found = True
        return found

    def _remember(self, correlation_id: str, outcome: str) -> None:
        self._ended[correlation_id] = outcome
        self._ended.move_to_end(correlation_id)
        while len(self._ended) > REMEMBERED:
            self._ended.popitem(last=False)

    def mark_down(self, reply_name: str, reason: str, fail_waiting: bool = True) -> None:
        """Refuse new requests on `reply_name` until mark_up; with `fail_waiting`, fail those already waiting.

        Without it the waiters keep waiting up to their own deadline: the
        listener is reconnecting and their replies can still arrive.
        """
        error = ListenerDown(f"the {reply_name} listener is not connected ({reason})")
        with self._lock:
            self._down[reply_name] = reason
            failed = [w for w in self._waiters.values() if w.reply_name == reply_name] if fail_waiting else []
            for waiter in failed:
                del self._waiters[waiter.correlation_id]
                self._count(reply_name, -1)
                self._remember(waiter.correlation_id, EXPIRED)
        for waiter in failed:
            waiter._complete(error=error)

    def is_down(self, reply_name: str) -> bool:
        with self._lock:
            return reply_name in self._down

    def mark_up(self, reply_name: str) -> None:
        with self._lock:
            self._down.pop(reply_name, None)

    def pending(self, reply_name: Optional[str] = None) -> int:
        with self._lock:
            return sum(1 for w in self._waiters.values() if reply_name in (None, w.reply_name))

    def pending_ids(self, reply_name: str) -> set:
        """Correlation ids still waiting on `reply_name`."""
        with self._lock:
            return {cid for cid, w in self._waiters.items() if w.reply_name == reply_name}

    def any_pending(self, correlation_ids) -> bool:
        with self._lock:
            return any(cid in self._waiters for cid in correlation_ids)
