"""The per-app parts (settings, verifier, backend, usage, billing, run controls, Events bus) and the run flow."""
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

from . import metrics
from .auth import TokenVerifier
from .backends import Backend, RunRequest, Watch, create_backend
from .backends.base import check_owner
from .billing import EventsBilling, NoBilling
from .bus.client import EventsError
from .config import Settings
from .controls import RunControls, fingerprint, never
from .errors import ProviderError, RunCancelled, as_provider_error, error_body
from .results import CANCELLED, ERROR, settle
from .schemas import run_answer_schema
from .state import create_store
from .usage import FAILED, FINISHED, REQUESTED, EventsUsage, MemoryUsage, NoUsage, usage_event

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Answer:
    """A run's answer as sent: what an Idempotency-Key remembers and replays."""

    status: int
    body: dict
    headers: dict = field(default_factory=dict)
    replayed: bool = False

    def stored(self) -> dict:
        return {"status": self.status, "body": self.body, "headers": self.headers}

    @classmethod
    def replay(cls, stored: dict) -> "Answer":
        return cls(stored["status"], stored["body"], dict(stored.get("headers") or {}), replayed=True)

    @classmethod
    def of_error(cls, exc, run_id: str) -> "Answer":
        """A delegated run's error, naming the run so the caller can read it later."""
        error = as_provider_error(exc)
        details = dict(error.details or {}, run_id=run_id)
        body = error_body(error.type, error.message, action=error.action, command=error.command, details=details)
        headers = {k: v for k, v in error.headers.items() if k == "Retry-After"}
        return cls(error.status, body, headers)


@dataclass
class Provider:
    settings: Settings
    verifier: TokenVerifier
    backend: Backend
    usage: NoUsage
    billing: NoBilling
    controls: RunControls
    bus: Optional[object] = None
    # Set when the shutdown grace has run out: every run still waiting is cancelled.
    draining: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        """Open reply streams and background work; once per worker, after fork."""
        if self.bus is not None:
            self.bus.start()
        self.usage.start()
        self.controls.start()

    def stop(self) -> None:
        # Usage first: its flush still needs the bus and, with an outbox, the store.
        self.usage.stop()
        self.controls.stop()
        if self.bus is not None:
            self.bus.stop()

    def drain(self) -> None:
        """The shutdown grace is over: cancel the runs still waiting, as if their callers had gone."""
        self.draining.set()

    def not_ready(self) -> list:
        """Names of what readiness still waits for: reply listeners, and `state` while the store is down."""
        missing = []
        if self.bus is not None and self.settings.listener_required:
            missing.extend(self.bus.disconnected())
        if self.settings.state_url and self.controls.down():
            missing.append("state")
        return missing

    def run(self, run: RunRequest, idempotency_key: Optional[str] = None,
            caller_gone: Callable[[], Optional[str]] = never) -> Answer:
        """Key, capacity, account slot, entitlement, usage record, the run, its usage record: in that order.

        Answers given before the run is handed to the backend are raised and never
        remembered; the answer of a handed-over run (its result, or its error) is
        returned and remembered under the Idempotency-Key.
        """
        controls, account = self.controls, run.owner_account_id
        # Only a key compares bodies: without one, canonical JSON and a hash per run buy nothing.
        body_fingerprint = fingerprint(run.body) if idempotency_key is not None else None
        key = controls.claim(account, idempotency_key, body_fingerprint, run.run_id)
        if key.answer is not None:
            return Answer.replay(key.answer)
        gone = self._cancelled(caller_gone)
        try:
            # A retry of a run in flight holds a thread as long as the run: it needs capacity too.
            with controls.capacity.hold(refusal=controls.busy(key) if key.holder else None):
                if key.holder is not None:
                    key = controls.join(key, body_fingerprint, run.run_id,
                                        wait=self.settings.run_wait(run.timeout_seconds), gone=gone)
                    if key.answer is not None:
                        return Answer.replay(key.answer)
                with controls.slot(account, run.run_id):
                    answer = self._delegate(run, gone)
        except BaseException:
            controls.forget(key, run.run_id)
            raise
        controls.remember(key, run.run_id, answer.stored())
        return answer

    def _delegate(self, run: RunRequest, gone) -> Answer:
        """Entitlement, then a usage record, then the run; no billing answer or no record means no run."""
        self.billing.check(run.owner_account_id)
        self._usage(REQUESTED, run, {
            key: getattr(run, key) for key in ("profile", "timeout_seconds") if getattr(run, key) is not None},
            now=True)
        watch = Watch(cancelled=gone)
        metrics.run_started()
        try:
            result = check_owner(self.backend.run(run, watch), run.owner_account_id)
        except RunCancelled as exc:
            metrics.run_failed(exc)
            # Nobody will read this run's result: bill nobody for it, and stop it.
            self._usage(FAILED, run, {"reason": CANCELLED})
            try:
                self.backend.cancel(run)
            except (ProviderError, EventsError) as error:
                log.warning("the cancel request for run %s was not published: %s", run.run_id, error)
            raise
        except Exception as exc:
            metrics.run_failed(exc)
            self._usage(FAILED, run, {"reason": as_provider_error(exc).type})
            if not watch.published:
                raise
            return Answer.of_error(exc, run.run_id)
        result = settle(result, self.settings.max_output_bytes)
        metrics.run_finished(result["status"])
        if result["status"] == ERROR:
            # The platform failed, not the user's code: not billed as runtime.
            self._usage(FAILED, run, {"reason": ERROR, "exit_code": result["exit_code"]})
        else:
            self._usage(FINISHED, run, {
                "duration_ms": result["duration_ms"], "exit_code": result["exit_code"], "image": result["image"],
                "status": result["status"]})
        return Answer(200, run_answer_schema.dump(result))

    def _usage(self, event_type: str, run: RunRequest, data: dict, now: bool = False) -> None:
        """A usage record, before the run (`now`: raises when it cannot be made) or after it."""
        if not self.usage.keeps_records:
            return  # --usage-backend none: no timestamp, no record dict, per run
        event = usage_event(event_type, run, data)
        (self.usage.record if now else self.usage.record_later)(event)

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
    provider = Provider(settings, TokenVerifier(settings.jwt_secret), backend, usage, billing, controls, bus)
    app.extensions["bus_containers"] = provider
    return provider
