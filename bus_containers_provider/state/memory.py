"""The in-process store: what one provider process agrees with itself (the default)."""
import itertools
import json
import threading
import time
from typing import Dict, Optional, Tuple

from .base import BOUND, FINISHED, IN_FLIGHT, RUNNING, Claim

SWEEP_SECONDS = 10.0
# One process's memory: keys and finished run records beyond this are forgotten oldest first
# (Redis has no such bound; its records expire by themselves).
MAX_RECORDS = 10_000


class Leases:
    """Ids held until an expiry; what a sorted set scored by expiry is in the Redis store."""

    def __init__(self):
        self._expiry: Dict[str, float] = {}

    def __len__(self):
        return len(self._expiry)

    def grant(self, item: str, until: float) -> None:
        self._expiry[item] = until

    def extend(self, items, until: float, now: Optional[float] = None) -> None:
        """Extend the leases of `items` held here (with `now`, only those still live); the others."""
        missing = []
        for item in items:
            expiry = self._expiry.get(item)
            if expiry is not None and (now is None or expiry > now):
                self._expiry[item] = until
            else:
                missing.append(item)
        return missing

    def live(self, now: float) -> Dict[str, float]:
        for item in [item for item, expiry in self._expiry.items() if expiry <= now]:
            del self._expiry[item]
        return self._expiry

    def due(self, now: float, limit: int):
        return [item for item, expiry in self._expiry.items() if expiry <= now][:limit]

    def drop(self, item: str) -> None:
        self._expiry.pop(item, None)

    def __contains__(self, item):
        return item in self._expiry


class MemoryStore:
    """Run controls for one process; same semantics as the Redis store, leases included."""

    def __init__(self, clock=time.monotonic, max_records: int = MAX_RECORDS):
        self._clock = clock
        self._max_records = max_records
        self._lock = threading.Lock()
        self._keys: Dict[str, Tuple[Claim, float]] = {}  # scope -> (record, expiry)
        self._slots: Dict[str, Leases] = {}  # account -> its runs' slots
        self._outbox: Dict[str, str] = {}  # event_id -> record JSON
        self._outbox_leases = Leases()
        self._runs: Dict[str, Tuple[str, float]] = {}  # run_id -> (record JSON, expiry), oldest first
        self._run_leases = Leases()
        self._next_sweep = 0.0

    # -- idempotency keys ------------------------------------------------------

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
            self._sweep(now)
            existing = self._live_key(scope, now)
            if existing is not None:
                if existing.state == IN_FLIGHT and existing.run_id == run_id:
                    return existing._replace(new=True)
                return existing
            claim = Claim(IN_FLIGHT, fingerprint, run_id)
            self._keys[scope] = (claim, now + lease)
            self._bound()
            return claim._replace(new=True)

    def read_key(self, scope):
        with self._lock:
            return self._live_key(scope, self._clock())

    def bind_key(self, scope, run_id, ttl):
        with self._lock:
            now = self._clock()
            existing = self._live_key(scope, now)
            if existing is not None and existing.run_id == run_id:
                self._keys.pop(scope)  # re-inserted last: the dict stays in order of hand-over
                self._keys[scope] = (existing._replace(state=BOUND), now + ttl)
                self._bound()

    def drop_key(self, scope, run_id):
        with self._lock:
            existing = self._keys.get(scope)
            if existing is not None and existing[0].run_id == run_id:
                del self._keys[scope]

    def _bound(self) -> None:
        # Keys bound to a run longest ago go first; one whose run is being handed over never does.
        # Oldest first, so the scan stops at the first few: a full store costs no walk over all its keys.
        excess = len(self._keys) - self._max_records
        if excess > 0:
            bound = (scope for scope, (claim, _) in self._keys.items() if claim.state == BOUND)
            for scope in list(itertools.islice(bound, excess)):
                del self._keys[scope]

    # -- account run slots -----------------------------------------------------

    def acquire_slot(self, account, run_id, limit, lease):
        with self._lock:
            now = self._clock()
            held = self._slots.setdefault(account, Leases())
            live = held.live(now)
            if limit and len(live) >= limit and run_id not in live:
                return False, len(live)
            held.grant(run_id, now + lease)
            return True, len(held)

    def release_slot(self, account, run_id):
        with self._lock:
            held = self._slots.get(account)
            if held is not None:
                held.drop(run_id)
                if not len(held):
                    del self._slots[account]

    def renew(self, slots, keys, lease):
        with self._lock:
            now = self._clock()
            for account, run_id in slots:
                held = self._slots.get(account)
                if held is not None:
                    # Only a live lease is extended: an expired one is gone, swept or not (as in Redis).
                    held.extend((run_id,), now + lease, now=now)
            for scope, run_id in keys:
                existing = self._live_key(scope, now)
                if existing is not None and existing.run_id == run_id and existing.state == IN_FLIGHT:
                    self._keys[scope] = (existing, now + lease)

    # -- the usage outbox ------------------------------------------------------

    def outbox_put(self, event_id, record, lease):
        with self._lock:
            # Stored as JSON, as in Redis: what comes back is a copy, never the caller's dict.
            self._outbox[event_id] = json.dumps(record)
            self._outbox_leases.grant(event_id, self._clock() + lease)

    def outbox_hold(self, event_ids, lease):
        with self._lock:
            self._outbox_leases.extend(event_ids, self._clock() + lease)

    def outbox_take(self, limit, lease):
        with self._lock:
            now = self._clock()
            due = self._outbox_leases.due(now, limit)
            for event_id in due:
                self._outbox_leases.grant(event_id, now + lease)
            return [json.loads(self._outbox[event_id]) for event_id in due]

    def outbox_done(self, event_id):
        with self._lock:
            self._outbox.pop(event_id, None)
            self._outbox_leases.drop(event_id)

    # -- run records -----------------------------------------------------------

    def _live_run(self, run_id: str, now: float) -> Optional[dict]:
        entry = self._runs.get(run_id)
        if entry is None:
            return None
        if entry[1] <= now:
            del self._runs[run_id]
            self._run_leases.drop(run_id)
            return None
        return json.loads(entry[0])

    def put_run(self, record, lease, ttl):
        with self._lock:
            now = self._clock()
            self._sweep(now)
            self._runs[record["run_id"]] = (json.dumps(record), now + ttl)
            self._run_leases.grant(record["run_id"], now + lease)
            self._bound_runs()

    def _bound_runs(self) -> None:
        # A running record is never forgotten for room: only finished ones, oldest first.
        excess = len(self._runs) - self._max_records
        if excess <= 0:
            return
        finished = (run_id for run_id in self._runs if run_id not in self._run_leases)
        for run_id in list(itertools.islice(finished, excess)):
            del self._runs[run_id]

    def read_run(self, run_id):
        with self._lock:
            return self._live_run(run_id, self._clock())

    def list_runs(self, account, limit):
        with self._lock:
            now = self._clock()
            records = [self._live_run(run_id, now) for run_id in reversed(list(self._runs))]
        mine = [r for r in records if r is not None and r["owner_account_id"] == account and not r.get("forgotten")]
        return sorted(mine, key=lambda r: r["created"], reverse=True)[:limit]

    def finish_run(self, run_id, account, answer, keep, forget=False):
        with self._lock:
            now = self._clock()
            record = self._live_run(run_id, now)
            if record is None or record["state"] != RUNNING:
                return False
            record.update(state=FINISHED, answer=answer, **({"forgotten": True} if forget else {}))
            self._run_leases.drop(run_id)
            del self._runs[run_id]
            if keep > 0:
                self._runs[run_id] = (json.dumps(record), now + keep)  # last: the dict stays oldest first
            return True

    def drop_run(self, run_id):
        with self._lock:
            self._runs.pop(run_id, None)
            self._run_leases.drop(run_id)

    def hold_runs(self, run_ids, lease):
        with self._lock:
            return self._run_leases.extend(run_ids, self._clock() + lease)

    def take_runs(self, limit, lease, run_id=None):
        with self._lock:
            now = self._clock()
            due = self._run_leases.due(now, len(self._run_leases))
            if run_id is not None:
                due = [run_id] if run_id in due else []
            taken = []
            for item in due[:limit]:
                record = self._live_run(item, now)
                if record is None or record["state"] != RUNNING:
                    self._run_leases.drop(item)
                    continue
                self._run_leases.grant(item, now + lease)
                taken.append(record)
            return taken

    def ping(self):
        return None

    def close(self):
        return None

    def _sweep(self, now: float) -> None:
        # Expired keys and records are forgotten in one pass every few seconds, not on every call.
        if now < self._next_sweep:
            return
        self._next_sweep = now + SWEEP_SECONDS
        for scope in [scope for scope, (_, expiry) in self._keys.items() if expiry <= now]:
            del self._keys[scope]
        for run_id in [run_id for run_id, (_, expiry) in self._runs.items() if expiry <= now]:
            del self._runs[run_id]
            self._run_leases.drop(run_id)
