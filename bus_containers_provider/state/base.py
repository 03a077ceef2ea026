"""The shared-state store interface: idempotency keys, account run slots, the usage outbox and run records.

Everything here is atomic per call. Slots, outbox records and run records are
held under one kind of lease (an id with an expiry: a sorted set scored by
expiry in Redis), so what a dead process held frees itself once the expiry
passes and the next process takes it; the live holder renews. Every method
raises errors.StateUnavailable when the store cannot be reached.
"""
from typing import Iterable, List, NamedTuple, Optional, Protocol, Tuple

IN_FLIGHT, BOUND = "in_flight", "bound"
RUNNING, FINISHED = "running", "finished"


class Claim(NamedTuple):
    """An idempotency record: which run holds the key, for which body; the answer is in the run's record."""

    state: str  # IN_FLIGHT (its run not handed over yet: leased) or BOUND (to the run record of `run_id`)
    fingerprint: str
    run_id: str
    new: bool = False  # True when this very call created the record


class StateStore(Protocol):
    def claim_key(self, scope: str, fingerprint: str, run_id: str, lease: float) -> Claim:
        """Create an in-flight record for `scope` (new=True), or return the one that exists.

        A record already in flight for this very `run_id` also answers new=True: the call was
        retried (a lost reply), and the run must not wait for itself.
        """

    def read_key(self, scope: str) -> Optional[Claim]:
        """The record for `scope`, or None when there is none (never made, expired or dropped)."""

    def bind_key(self, scope: str, run_id: str, ttl: float) -> None:
        """Point the key at `run_id`'s run record for `ttl` seconds, no longer leased (its run is handed over)."""

    def drop_key(self, scope: str, run_id: str) -> None:
        """Forget `run_id`'s record, in flight or bound (its answer is not to be remembered)."""

    def acquire_slot(self, account: str, run_id: str, limit: int, lease: float) -> Tuple[bool, int]:
        """Take one of `account`'s run slots unless `limit` are held; (taken, held including this one)."""

    def release_slot(self, account: str, run_id: str) -> None:
        """Give the slot back; releasing one that is not held does nothing."""

    def renew(self, slots: Iterable[Tuple[str, str]], keys: Iterable[Tuple[str, str]], lease: float) -> None:
        """Extend the leases of held (account, run_id) slots and in-flight (scope, run_id) records.

        A lease that has already expired is not brought back: what it held may be someone else's now.
        """

    # The usage outbox: records not yet confirmed, kept where any process can send them.
    # A holder renews its lease while it sends; once the lease passes (the holder died or
    # gave up), outbox_take hands the record to whoever asks next.

    def outbox_put(self, event_id: str, record: dict, lease: float) -> None:
        """Keep `record` (JSON) under `event_id` until outbox_done, held by the caller for `lease` seconds."""

    def outbox_hold(self, event_ids: Iterable[str], lease: float) -> None:
        """Extend the caller's lease on records it holds; records already done are not brought back."""

    def outbox_take(self, limit: int, lease: float) -> List[dict]:
        """Up to `limit` records whose lease has passed, each now held by the caller for `lease` seconds."""

    def outbox_done(self, event_id: str) -> None:
        """Forget a record that was recorded; forgetting one that is not kept does nothing."""

    # Run records (CONTRACT §9): a JSON object per run_id with `state` RUNNING, then FINISHED
    # and its `answer`; a running record is leased by the process that completes it.

    def put_run(self, record: dict, lease: float, ttl: float) -> None:
        """Keep a new running record for `ttl` seconds, held by the caller for `lease` seconds."""

    def read_run(self, run_id: str) -> Optional[dict]:
        """The record of `run_id`, deleted ones too (`forgotten`), or None (never made, expired, dropped)."""

    def list_runs(self, account: str, limit: int) -> List[dict]:
        """`account`'s records, the `limit` newest, newest first."""

    def finish_run(self, run_id: str, account: str, answer: dict, keep: float,
                   forget: bool = False) -> bool:
        """Finish `account`'s running record with `answer`, kept `keep` seconds (0: not at all) and unleased.

        True when this very call finished it, False when it was finished
        already or is gone: exactly one caller completes a run.
        `forget` hides it from reads and lists (a deleted run) while it is kept.
        """

    def drop_run(self, run_id: str) -> None:
        """Forget a record whose run was never handed over."""

    def hold_runs(self, run_ids: Iterable[str], lease: float) -> List[str]:
        """Extend the caller's leases on running records (lease 0: give them up to whoever takes them).

        Returns the run ids no longer leased: finished (or gone) meanwhile.
        """

    def take_runs(self, limit: int, lease: float, run_id: Optional[str] = None) -> List[dict]:
        """Up to `limit` running records whose lease has passed (or just `run_id`'s), now held by the caller."""

    def ping(self) -> None:
        """Return when the store answers; raise StateUnavailable when it does not."""

    def close(self) -> None:
        """Release connections."""
