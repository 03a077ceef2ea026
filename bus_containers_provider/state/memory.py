"""The in-process store: what one provider process agrees with itself (the default)."""
import threading
import time
from typing import Dict, Optional, Tuple

from .base import DONE, IN_FLIGHT, Claim

SWEEP_SECONDS = 10.0


class MemoryStore:
    """Run controls for one process; same semantics as the Redis store, leases included."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: Dict[str, Tuple[Claim, float]] = {}  # scope -> (record, expiry)
        self._slots: Dict[str, Dict[str, float]] = {}  # account -> {run_id: expiry}
        self._next_sweep = 0.0

    def _live_key(self, scope: str, now: float) -> Optional[Claim]:
        entry = self._keys.get(scope)
        if entry is None:
            return None
        if entry[1] <= now:
            del self._keys[scope]
            return None
        return entry[0]

    def claim_key(self, scope, fingerprint, run_id, lease):
        with self._lock:
            now = self._clock()
            self._sweep_keys(now)
            existing = self._live_key(scope, now)
            if existing is not None:
                if existing.state == IN_FLIGHT and existing.run_id == run_id:
                    return existing._replace(new=True)
                return existing
            claim = Claim(IN_FLIGHT, fingerprint, run_id)
            self._keys[scope] = (claim, now + lease)
            return claim._replace(new=True)

    def read_key(self, scope):
        with self._lock:
            return self._live_key(scope, self._clock())

    def finish_key(self, scope, run_id, answer, ttl):
        with self._lock:
            now = self._clock()
            existing = self._live_key(scope, now)
            if existing is not None and existing.run_id == run_id:
                self._keys[scope] = (existing._replace(state=DONE, answer=answer), now + ttl)

    def drop_key(self, scope, run_id):
        with self._lock:
            existing = self._keys.get(scope)
            if existing is not None and existing[0].run_id == run_id and existing[0].state == IN_FLIGHT:
                del self._keys[scope]

    def acquire_slot(self, account, run_id, limit, lease):
        with self._lock:
            now = self._clock()
            held = {r: e for r, e in self._slots.get(account, {}).items() if e > now}
            if limit and len(held) >= limit and run_id not in held:
                self._slots[account] = held
                return False, len(held)
            held[run_id] = now + lease
            self._slots[account] = held
            return True, len(held)

    def release_slot(self, account, run_id):
        with self._lock:
            held = self._slots.get(account)
            if held is not None:
                held.pop(run_id, None)
                if not held:
                    del self._slots[account]

    def renew(self, slots, keys, lease):
        with self._lock:
            now = self._clock()
            for account, run_id in slots:
                held = self._slots.get(account)
                # Only a live lease is extended: an expired one is gone, swept or not (as in Redis).
                if held is not None and held.get(run_id, now) > now:
                    held[run_id] = now + lease
            for scope, run_id in keys:
                existing = self._live_key(scope, now)
                if existing is not None and existing.run_id == run_id and existing.state == IN_FLIGHT:
                    self._keys[scope] = (existing, now + lease)

    def ping(self):
        return None

    def close(self):
        return None

    def _sweep_keys(self, now: float) -> None:
        # Expired records are forgotten in one pass every few seconds, not on every claim.
        if now < self._next_sweep:
            return
        self._next_sweep = now + SWEEP_SECONDS
        for scope in [scope for scope, (_, expiry) in self._keys.items() if expiry <= now]:
            del self._keys[scope]
