"""Run controls (CONTRACT §7): Idempotency-Key, account run slots, this worker's run capacity.

What processes must agree on (keys, slots) lives in the state store; the
run capacity is this worker's own, by design: it protects this worker's threads.
A key points at its run's record (records.py) once the run is handed over;
the record, not the key, keeps the answer.
"""
import hashlib
import json
import logging
import select
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Optional

from . import metrics
from .errors import BadRequest, Conflict, IdempotencyKeyReused, TooManyRuns, Unavailable
from .state.base import BOUND

log = logging.getLogger(__name__)

# A lease outlives its holder by at most this (CONTRACT: a dead process frees its slots within 60 s).
LEASE_SECONDS = 30.0
RENEW_SECONDS = 10.0
# Retry-After (seconds) for each refusal; runs last seconds to hours, so clients should not hammer.
RETRY_SLOT = 5
RETRY_CAPACITY = 2
RETRY_CONFLICT = 5
# A joined retry looks at the first run's record this often (backing off to the longest).
JOIN_POLL = (0.05, 1.0)
_PRINTABLE = frozenset(chr(c) for c in range(0x21, 0x7F))


def parse_key(value: Optional[str]) -> Optional[str]:
    """The Idempotency-Key: 1-255 of `!`..`~`, a Structured Field string unquoted first; else 400."""
    if value is None:
        return None
    key = value.strip()
    if len(key) >= 2 and key[0] == key[-1] == '"':
        key = _sf_string(key[1:-1])
    if not 1 <= len(key) <= 255 or not set(key) <= _PRINTABLE:
        raise BadRequest("Idempotency-Key must be 1-255 printable ASCII characters without spaces")  # pragma: no mutate
    return key


def _sf_string(inner: str) -> str:
    # RFC 8941 §3.3.3: only \" and \\ are escapes, and a bare " cannot appear.
    out, chars = [], iter(inner)
    for char in chars:
        if char == "\\":
            char = next(chars, "")
            if char not in ('"', "\\"):
                raise BadRequest("Idempotency-Key is not a valid Structured Field string")  # pragma: no mutate
        elif char == '"':
            raise BadRequest("Idempotency-Key is not a valid Structured Field string")  # pragma: no mutate
        out.append(char)
    return "".join(out)


def fingerprint(body: dict) -> str:
    """The validated body in canonical form (key order and white space do not matter), hashed."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


def key_scope(account: str, key: str) -> str:
    """Keys belong to the account; hashed, so neither appears in the store's key names."""
    return hashlib.sha256(f"{account}\0{key}".encode("utf-8", "surrogatepass")).hexdigest()


def caller_gone(environ) -> Callable[[], Optional[str]]:
    """A check for a caller whose connection closed (gunicorn puts the socket in the environ)."""
    sock = environ.get("gunicorn.socket")
    if sock is None:
        return never

    def gone() -> Optional[str]:
        return "the caller went away" if _closed(sock) else None

    return gone


def never() -> Optional[str]:
    return None


def _closed(sock) -> bool:
    # Readable with nothing to read is EOF; readable with data is a pipelined request, not a close.
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN | select.POLLPRI)
        events = poller.poll(0)
        if not events:
            return False
        if events[0][1] & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
            return True
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except (OSError, ValueError):
        return True


class Capacity:
    """How many runs this worker holds at once; the rest of its threads stay free for everything else."""

    def __init__(self, size: int):
        self.size = size
        self._lock = threading.Lock()
        self.in_use = 0

    @contextmanager
    def hold(self, refusal: Optional[Exception] = None):
        """A run's place for the duration of the block; `refusal` (default a 503) when none is free."""
        if not self._take():
            metrics.rejected("capacity" if refusal is None else "conflict")
            raise refusal or Unavailable("this worker's run capacity is taken; try again or another host",
                                         retry_after=RETRY_CAPACITY)
        try:
            yield True
        finally:
            self._give()

    @contextmanager
    def hold_if_free(self):
        """A place for a wait that may also be skipped: yields whether one was free."""
        taken = self._take()
        try:
            yield taken
        finally:
            if taken:
                self._give()

    def _take(self) -> bool:
        with self._lock:
            if self.in_use >= self.size:
                return False
            self.in_use += 1
            return True

    def _give(self) -> None:
        with self._lock:
            self.in_use -= 1


@dataclass(frozen=True)
class Key:
    """One request's standing on its Idempotency-Key (no key: all fields empty)."""

    scope: Optional[str] = None
    new: bool = False  # this request holds the key and runs
    holder: Optional[str] = None  # run id of the first request, its run not handed over yet
    bound: Optional[str] = None  # run id of the first request, handed over: its record has the answer


@dataclass
class _Held:
    slots: set = field(default_factory=set)  # (account, run_id)
    keys: set = field(default_factory=set)  # (scope, run_id)


class RunControls:
    """Keys, slots and capacity for one app; the store is shared, the capacity and leases are this process's."""

    def __init__(self, store, *, max_runs_per_account: int, run_capacity: int, idempotency_ttl: float):
        self.store = store
        self.capacity = Capacity(run_capacity)
        self._limit = max_runs_per_account
        self._ttl = idempotency_ttl
        self._held = _Held()
        self._held_lock = threading.Lock()

    # -- Idempotency-Key ---------------------------------------------------

    def claim(self, account: str, key: Optional[str], body_fingerprint: str, run_id: str) -> Key:
        """This request's claim on `key`: new (it runs), the first answer, or the first still in flight.

        The same key with a different body is a 422.
        """
        if key is None:
            return Key()
        scope = key_scope(account, key)
        record = self.store.claim_key(scope, body_fingerprint, run_id, LEASE_SECONDS)
        if record.fingerprint != body_fingerprint:
            metrics.rejected("idempotency_key_reused")
            raise IdempotencyKeyReused()
        if record.new:
            self._hold(keys=(scope, run_id))
            return Key(scope, new=True)
        if record.state == BOUND:
            return Key(scope, bound=record.run_id)
        return Key(scope, holder=record.run_id)

    def join(self, key: Key, body_fingerprint: str, run_id: str, *, wait: float,
             gone: Callable[[], Optional[str]]) -> Key:
        """Wait until the first request hands its run over (or gives up); 409 when `wait` runs out first.

        A record that disappears (the first was answered before its run was
        handed over) is claimed again, so the retry runs instead; if another
        request claimed it first, that one is waited for in turn.
        """
        deadline = time.monotonic() + wait
        delay = JOIN_POLL[0]
        while key.holder is not None:
            if gone() or time.monotonic() + delay > deadline:
                metrics.rejected("conflict")
                raise self.busy(key)
            time.sleep(delay)
            delay = min(delay * 2, JOIN_POLL[1])
            record = self.store.read_key(key.scope)
            if record is None:
                key = self._reclaim(key, body_fingerprint, run_id)
                continue
            if record.state == BOUND:
                return Key(key.scope, bound=record.run_id)
        return key

    def _reclaim(self, key: Key, body_fingerprint: str, run_id: str) -> Key:
        record = self.store.claim_key(key.scope, body_fingerprint, run_id, LEASE_SECONDS)
        if record.new:
            self._hold(keys=(key.scope, run_id))
            return Key(key.scope, new=True)
        if record.fingerprint != body_fingerprint:
            metrics.rejected("idempotency_key_reused")
            raise IdempotencyKeyReused()
        return Key(key.scope, bound=record.run_id) if record.state == BOUND else Key(key.scope, holder=record.run_id)

    @staticmethod
    def busy(key: Key) -> Conflict:
        """The refusal for a retry that cannot wait for the first run of its key."""
        return Conflict(details={"run_id": key.holder or key.bound}, headers={"Retry-After": str(RETRY_CONFLICT)})

    def bind(self, key: Key, run_id: str) -> None:
        """The run is being handed over: from now on the key names its record for the key's lifetime."""
        if not key.new:
            return
        self.store.bind_key(key.scope, run_id, self._ttl)
        self._release(keys=(key.scope, run_id))

    def drop_key(self, scope: str, run_id: str) -> None:
        """A handed-over run was cancelled by circumstance (caller gone, shutdown): a retry may run it again."""
        self.forget(Key(scope, new=True), run_id)

    def forget(self, key: Key, run_id: str) -> None:
        """An answer given before delegation is not remembered: a retry tries again."""
        if not key.new:
            return
        self._release(keys=(key.scope, run_id))
        try:
            self.store.drop_key(key.scope, run_id)
        except Unavailable:
            log.warning("could not drop an Idempotency-Key record for run %s; it expires with its lease", run_id)  # pragma: no mutate

    # -- account run slots ---------------------------------------------------

    def take_slot(self, account: str, run_id: str) -> None:
        """One of the account's run slots, held until release_slot; 429 when all are taken."""
        if not self._limit:
            return
        taken, in_flight = self.store.acquire_slot(account, run_id, self._limit, LEASE_SECONDS)
        if not taken:
            metrics.rejected("too_many_runs")
            raise TooManyRuns(
                f"the account already has {in_flight} runs in flight (limit {self._limit})",
                details={"limit": self._limit, "in_flight": in_flight},
                headers={"Retry-After": str(RETRY_SLOT)})
        self._hold(slots=(account, run_id))

    def hold_slot(self, account: str, run_id: str) -> None:
        """Hold an adopted run's slot again, whatever the limit: the run is in flight already."""
        if not self._limit:
            return
        try:
            self.store.acquire_slot(account, run_id, 0, LEASE_SECONDS)
        except Unavailable:
            log.warning("could not hold the slot of adopted run %s", run_id)  # pragma: no mutate
            return
        self._hold(slots=(account, run_id))

    def release_slot(self, account: str, run_id: str) -> None:
        """Give the slot back, on every path; one not held does nothing."""
        if not self._limit:
            return
        self._release(slots=(account, run_id))
        try:
            self.store.release_slot(account, run_id)
        except Unavailable:
            log.warning("could not release the slot of run %s; it frees itself with its lease", run_id)  # pragma: no mutate

    # -- leases ------------------------------------------------------------

    def _hold(self, slots=None, keys=None) -> None:
        with self._held_lock:
            if slots:
                self._held.slots.add(slots)
            if keys:
                self._held.keys.add(keys)

    def _release(self, slots=None, keys=None) -> None:
        with self._held_lock:
            self._held.slots.discard(slots)
            self._held.keys.discard(keys)

    def renew(self) -> None:
        """Extend every lease this process holds (its runs are alive); the run records' keeper calls it."""
        with self._held_lock:
            slots, keys = list(self._held.slots), list(self._held.keys)
        if slots or keys:
            self.store.renew(slots, keys, LEASE_SECONDS)

    def stop(self) -> None:
        self.store.close()

    def down(self) -> bool:
        """True while the state store cannot be reached (readiness names `state`)."""
        try:
            self.store.ping()
        except Unavailable:
            return True
        return False
