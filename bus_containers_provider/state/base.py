"""The run-control store interface: idempotency records and account run slots, both leased.

Everything here is atomic per call. Leases carry an expiry, so what a dead
process held frees itself once the expiry passes; the live holder renews.
Every method raises errors.StateUnavailable when the store cannot be reached.
"""
from typing import Iterable, NamedTuple, Optional, Protocol, Tuple

IN_FLIGHT, DONE = "in_flight", "done"


class Claim(NamedTuple):
    """An idempotency record: who holds the key, for which body, and the answer once there is one."""

    state: str  # IN_FLIGHT or DONE
    fingerprint: str
    run_id: str
    answer: Optional[dict] = None  # {"status": int, "body": dict, "headers": {name: value}} when DONE
    new: bool = False  # True when this very call created the record


class StateStore(Protocol):
    def claim_key(self, scope: str, fingerprint: str, run_id: str, lease: float) -> Claim:
        """Create an in-flight record for `scope` (new=True), or return the one that exists.

        A record already in flight for this very `run_id` also answers new=True: the call was
        retried (a lost reply), and the run must not wait for itself.
        """

    def read_key(self, scope: str) -> Optional[Claim]:
        """The record for `scope`, or None when there is none (never made, expired or dropped)."""

    def finish_key(self, scope: str, run_id: str, answer: dict, ttl: float) -> None:
        """Store the answer for `ttl` seconds, if the record is still `run_id`'s."""

    def drop_key(self, scope: str, run_id: str) -> None:
        """Forget an in-flight record of `run_id`'s (its answer is not to be remembered)."""

    def acquire_slot(self, account: str, run_id: str, limit: int, lease: float) -> Tuple[bool, int]:
        """Take one of `account`'s run slots unless `limit` are held; (taken, held including this one)."""

    def release_slot(self, account: str, run_id: str) -> None:
        """Give the slot back; releasing one that is not held does nothing."""

    def renew(self, slots: Iterable[Tuple[str, str]], keys: Iterable[Tuple[str, str]], lease: float) -> None:
        """Extend the leases of held (account, run_id) slots and in-flight (scope, run_id) records.

        A lease that has already expired is not brought back: what it held may be someone else's now.
        """

    def ping(self) -> None:
        """Return when the store answers; raise StateUnavailable when it does not."""

    def close(self) -> None:
        """Release connections."""
