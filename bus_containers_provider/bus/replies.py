"""Correlation id -> waiter: the one place replies meet the requests that wait for them."""
import threading
import time
from typing import Callable, Dict, Optional

from ..errors import RunCancelled
from .client import ListenerDown, ReplyTimeout

# How often a wait asks whether it was cancelled (a caller gone is noticed within this).
CANCEL_POLL_SECONDS = 0.5


class Waiter:
    """One request's wait for its reply; completed at most once."""

    __slots__ = ("reply_name", "correlation_id", "_done", "_envelope", "_error")

    def __init__(self, reply_name: str, correlation_id: str):
        self.reply_name = reply_name
        self.correlation_id = correlation_id
        self._done = threading.Event()
        self._envelope = None
        self._error = None

    def _complete(self, envelope=None, error=None) -> None:
        if not self._done.is_set():
            self._envelope, self._error = envelope, error
            self._done.set()

    def wait(self, timeout: float, cancelled: Optional[Callable[[], Optional[str]]] = None) -> dict:
        """The reply envelope; ReplyTimeout when none came within `timeout` seconds.

        With `cancelled`, the wait is cut into short slices and ends with
        RunCancelled as soon as it returns a reason.
        """
        if cancelled is None:
            done = self._done.wait(timeout)
        else:
            deadline = time.monotonic() + timeout
            while not (done := self._done.wait(min(CANCEL_POLL_SECONDS, max(0.0, deadline - time.monotonic())))):
                reason = cancelled()
                if reason:
                    raise RunCancelled(reason)
                if time.monotonic() >= deadline:
                    break
        if not done:
            raise ReplyTimeout(f"no {self.reply_name} reply within {timeout:g}s")
        if self._error is not None:
            raise self._error
        return self._envelope


class ReplyRegistry:
    """Thread-safe map of pending waiters for one provider process."""

    def __init__(self):
        self._lock = threading.Lock()
        self._waiters: Dict[str, Waiter] = {}
        self._down: Dict[str, str] = {}

    def register(self, reply_name: str, correlation_id: str) -> Waiter:
        """Add a waiter (before publishing, so a fast reply finds it); refuse while the reply stream is down."""
        waiter = Waiter(reply_name, correlation_id)
        with self._lock:
            reason = self._down.get(reply_name)
            if reason is None:
                self._waiters[correlation_id] = waiter
        if reason is not None:
            raise ListenerDown(f"the {reply_name} listener is not connected ({reason})")
        return waiter

    def discard(self, waiter: Waiter) -> None:
        with self._lock:
            if self._waiters.get(waiter.correlation_id) is waiter:
                del self._waiters[waiter.correlation_id]

    def resolve(self, reply_name: str, envelope: dict) -> bool:
        """Hand a reply to its waiter; unknown, late and other processes' replies are dropped."""
        correlation_id = envelope.get("correlationId", envelope.get("correlation_id"))
        if not isinstance(correlation_id, str):
            return False
        with self._lock:
            waiter = self._waiters.get(correlation_id)
            if waiter is None or waiter.reply_name != reply_name:
                return False
            del self._waiters[correlation_id]
        waiter._complete(envelope=envelope)
        return True

    def mark_down(self, reply_name: str, reason: str) -> None:
        """Fail every request waiting on `reply_name`, and refuse new ones until mark_up."""
        error = ListenerDown(f"the {reply_name} listener is not connected ({reason})")
        with self._lock:
            self._down[reply_name] = reason
            failed = [w for w in self._waiters.values() if w.reply_name == reply_name]
            for waiter in failed:
                del self._waiters[waiter.correlation_id]
        for waiter in failed:
            waiter._complete(error=error)

    def mark_up(self, reply_name: str) -> None:
        with self._lock:
            self._down.pop(reply_name, None)

    def pending(self, reply_name: Optional[str] = None) -> int:
        with self._lock:
            return sum(1 for w in self._waiters.values() if reply_name in (None, w.reply_name))
