"""The per-app parts (settings, verifier, backend, usage, billing, run controls, records, Events bus) and the run flow."""
import logging
import threading
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Optional

from .auth import TokenVerifier
from .backends import Backend, RunRequest, create_backend
from .billing import EventsBilling, NoBilling
from .config import Settings
from .controls import RunControls, fingerprint, never
from .errors import Conflict, StateUnavailable, Unavailable
from .logs import backend_timer
from .prefer import NONE, Preferences
from .records import POLL_HINT, Answer, RunRecords, item
from .state import create_store
from .state.base import FINISHED, RUNNING
from .usage import REQUESTED, EventsUsage, MemoryUsage, NoUsage, usage_event

log = logging.getLogger(__name__)

RUNS_PATH = "/api/v1/containers/runs"
# The newest of the caller's records a listing shows.
LISTED = 100


@dataclass
class Provider:
    settings: Settings
    verifier: TokenVerifier
    backend: Backend
    usage: NoUsage
    billing: NoBilling
    controls: RunControls
    records: RunRecords
    bus: Optional[object] = None
    # Set when the shutdown grace has run out: every run still waiting is cancelled.
    draining: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        """Open reply streams and background work; once per worker, after fork."""
        if self.bus is not None:
            self.bus.start()
        self.usage.start()
        self.records.start()

    def stop(self) -> None:
        if not self.settings.state_url:
            # Nobody else could finish a detached run: it gets the shutdown grace (drain ends it), then is
            # cancelled like a foreground run. With a shared store another process adopts it instead.
            self.records.wait_detached(self.draining, self.settings.shutdown_grace)
            self.records.cancel_detached("the provider is shutting down")
        # Records first (what they finish still records usage); usage next: its flush still needs
        # the bus and, with an outbox, the store.
        self.records.stop(hand_over=bool(self.settings.state_url))
        self.usage.stop()
        self.controls.stop()
        if self.bus is not None:
            self.bus.stop()

    def drain(self) -> None:
        """The shutdown grace is over: cancel the runs still waiting, as if their callers had gone.

        Detached runs too, unless another process sharing the store can adopt them.
        """
        if self.settings.state_url:
            # Foreground runs still waiting are left to another process, like detached ones: cancelled,
            # a retry with their key would run them a second time.
            self.records.hand_over_waits.set()
        self.draining.set()
        if not self.settings.state_url:
            self.records.cancel_detached("the provider is shutting down")

    def not_ready(self) -> list:
        """Names of what readiness still waits for: reply listeners, and `state` while the store is down."""
        missing = []
        if self.bus is not None and self.settings.listener_required:
            missing.extend(self.bus.disconnected())
        if self.settings.state_url and self.controls.down():
            missing.append("state")
        return missing

    # -- POST /runs ------------------------------------------------------------

    def run(self, run: RunRequest, idempotency_key: Optional[str] = None,
            caller_gone: Callable[[], Optional[str]] = never, prefer: Preferences = NONE) -> Answer:
        """Key, capacity, account slot, entitlement, usage record, publish, then wait or detach: in that order.

        Answers given before the run is handed over are raised and never
        remembered; once it is handed over its record has the answer, and the
        key points at the record.
        """
        if self.draining.is_set():
            # Past the shutdown grace nothing new is handed over: it would be cancelled at once.
            raise Unavailable("the provider is shutting down; try again or another host")
        controls, account = self.controls, run.owner_account_id
        # Only a key compares bodies: without one, canonical JSON and a hash per run buy nothing.
        body_fingerprint = fingerprint(run.body) if idempotency_key is not None else None
        key = controls.claim(account, idempotency_key, body_fingerprint, run.run_id)
        gone = self._cancelled(caller_gone)
        detached = prefer.respond_async
        if key.bound is not None and self._answered(key, prefer):
            return self._again(key, run, prefer, gone)  # a replay holds no thread for long: no capacity needed
        # A foreground run (or a retry waiting for one) holds a thread for the run's life: it needs capacity.
        refusal = controls.busy(key) if key.holder or key.bound else None
        with nullcontext() if detached else controls.capacity.hold(refusal=refusal):
            if key.holder is not None:
                key = controls.join(key, body_fingerprint, run.run_id,
                                    wait=self.settings.run_wait(run.timeout_seconds), gone=gone)
            if key.bound is not None:
                return self._again(key, run, prefer, gone)
            with backend_timer():
                live = self._hand_over(run, key, detached)
                if not detached:
                    return self.records.wait(live, gone)
        return self._detached(live.record, prefer)

    def _hand_over(self, run: RunRequest, key, detached: bool):
        """Account slot, entitlement, usage record, then the run's record and request.

        No billing answer or no usage record means no run; whatever fails
        before the run is handed over frees the slot and the key.
        """
        controls, account = self.controls, run.owner_account_id
        try:
            controls.take_slot(account, run.run_id)
            try:
                self.billing.check(account)
                self._usage_now(run)
                return self.records.open(run, key, detached=detached)
            except BaseException:
                controls.release_slot(account, run.run_id)
                raise
        except BaseException:
            controls.forget(key, run.run_id)
            raise

    def _answered(self, key, prefer: Preferences) -> bool:
        """Whether a retry of a handed-over run is answered at once (nothing to wait for in the foreground)."""
        record = self.records.read(key.bound)
        return record is None or record["state"] == FINISHED or record["detached"] or prefer.respond_async

    def _again(self, key, run: RunRequest, prefer: Preferences, gone) -> Answer:
        """A retry of a key whose run was handed over: that run's answer, never a second run."""
        record = self.records.read(key.bound)
        if record is None:
            raise Conflict(f"the run of this Idempotency-Key ({key.bound}) is no longer kept; use a new key",
                           details={"run_id": key.bound}, headers={"Retry-After": str(POLL_HINT)})
        if record["detached"] or prefer.respond_async:
            return self._detached(record, prefer, replayed=True)
        if record["state"] == RUNNING:
            # Bounded by this request's own run wait; the run is adopted if its holder went away.
            record = self.records.await_finished(record["run_id"], self.settings.run_wait(run.timeout_seconds),
                                                 gone, adopt=True)
            if record is None or record["state"] != FINISHED:
                raise self.controls.busy(key)
        return Answer.of(record["answer"], replayed=True)

    def _detached(self, record: dict, prefer: Preferences, replayed: bool = False) -> Answer:
        """The 202 and the run's item; with `wait=N`, the foreground answer if the run finishes by then."""
        granted = None
        if prefer.wait and record["state"] == RUNNING:
            with self.controls.capacity.hold_if_free() as free:
                if free:
                    granted = min(prefer.wait, int(self.settings.max_wait))
                    record = self.records.await_finished(record["run_id"], granted) or record
        applied = f"wait={granted}" if granted is not None else None
        if record["state"] == FINISHED and granted is not None:
            answer = Answer.of(record["answer"], replayed=replayed)
            return Answer(answer.status, answer.body, dict(answer.headers, **{"Preference-Applied": applied}),
                          replayed=replayed)
        headers = {"Location": f"{RUNS_PATH}/{record['run_id']}", "Retry-After": str(POLL_HINT),
                   "Preference-Applied": "respond-async" + (f", {applied}" if applied else "")}
        return Answer(202, item(record), headers, replayed=replayed)

    # -- reads and deletes -----------------------------------------------------

    def read_run(self, account: str, run_id: str, wait: Optional[int] = None):
        """(item, headers) of one of the caller's runs: from its record, else from the backend (§3).

        With the store away, a run held here is read from its record; any other read is a 503 (the
        backend's item of a run with a record would lack its result), never a 404 or a partial item.
        """
        record = self._record_of(account, run_id, strict=True)
        if record is None:
            return self.backend.get_run(account, run_id), {}
        headers = {}
        if wait and record["state"] == RUNNING:
            # A wait holds a thread: only with capacity to spare; without, the item is answered at once.
            with self.controls.capacity.hold_if_free() as free:
                if free:
                    granted = min(wait, int(self.settings.max_wait))
                    headers["Preference-Applied"] = f"wait={granted}"
                    record = self.records.await_finished(run_id, granted) or record
        if record["state"] == RUNNING:
            headers["Retry-After"] = str(POLL_HINT)
        return item(record), headers

    def list_runs(self, account: str) -> list:
        """The caller's records, newest first, then the backend's runs that have none."""
        try:
            items = [item(record) for record in self.records.store.list_runs(account, LISTED)]
        except StateUnavailable:
            items = []  # the backend's items still answer while the store is down
        listed = {shown["id"] for shown in items}
        return items + [shown for shown in self.backend.runs(account) if shown["id"] not in listed]

    def delete_run(self, account: str, run_id: str) -> dict:
        """Cancel a running run with a record (everyone waiting gets `cancelled`), or delete via the backend."""
        record = self._record_of(account, run_id)
        if record is not None and record["state"] == RUNNING:
            self.records.cancel(record)
            return {"deleted": True, "run_id": run_id, "owner_account_id": account}
        result = self.backend.delete(account, run_id)
        if record is not None:
            self.records.forget(record)
        return result

    # -- helpers -------------------------------------------------------------------

    def _record_of(self, account: str, run_id: str, strict: bool = False) -> Optional[dict]:
        """The caller's record of `run_id`; another account's is as absent as a missing one, so both are
        answered the same way (by the backend: 404), with no wait and nothing that tells them apart.

        With the store away: the record this process holds, if any; else, `strict`, the store's 503.
        """
        try:
            record = self.records.read(run_id)
        except StateUnavailable:
            record = self.records.held(run_id)
            if record is None and strict:
                raise
        return record if record is not None and record["owner_account_id"] == account else None

    def _usage_now(self, run: RunRequest) -> None:
        """`container_run_requested`, before the run: raises when it cannot be made."""
        if not self.usage.keeps_records:
            return  # --usage-backend none: no timestamp, no record dict, per run
        self.usage.record(usage_event(REQUESTED, run, {
            key: getattr(run, key) for key in ("profile", "timeout_seconds") if getattr(run, key) is not None}))

    def _cancelled(self, caller_gone):
        def cancelled() -> Optional[str]:
            if self.draining.is_set():
                return "the provider is shutting down"
            return caller_gone()

        return cancelled


def init_app(app, settings: Settings) -> Provider:
    bus = None
    if settings.uses_events:
        from .bus import Bus

        bus = Bus(settings)
    store = create_store(settings)
    usage = {"none": NoUsage, "memory": MemoryUsage}.get(settings.usage_backend)
    # With a shared store, pending usage records live in its outbox, so a killed process loses none.
    usage = usage() if usage else EventsUsage(
        bus, settings.request_timeout, outbox=store if settings.state_url else None,
        flush_timeout=min(settings.request_timeout + 5, settings.shutdown_grace))
    billing = EventsBilling(bus, settings.request_timeout) if settings.billing_backend == "events" else NoBilling()
    backend = create_backend(settings, bus)
    if bus is not None:
        bus.listen_for(*backend.reply_names, *usage.reply_names, *billing.reply_names)
    controls = RunControls(store, max_runs_per_account=settings.max_runs_per_account,
                           run_capacity=settings.run_capacity, idempotency_ttl=settings.idempotency_ttl)
    records = RunRecords(store, backend, usage, controls, settings)
    provider = Provider(settings, TokenVerifier(settings.jwt_secret), backend, usage, billing, controls, records, bus)
    app.extensions["bus_containers"] = provider
    return provider
