"""The per-app parts (settings, verifier, backend, usage, billing, Events bus) and the run flow."""
from dataclasses import dataclass
from typing import Optional

from . import metrics
from .auth import TokenVerifier
from .backends import Backend, RunRequest, create_backend
from .backends.base import check_owner
from .billing import EventsBilling, NoBilling
from .config import Settings
from .errors import as_provider_error
from .usage import FAILED, FINISHED, REQUESTED, EventsUsage, MemoryUsage, NoUsage, usage_event


@dataclass
class Provider:
    settings: Settings
    verifier: TokenVerifier
    backend: Backend
    usage: NoUsage
    billing: NoBilling
    bus: Optional[object] = None

    def start(self) -> None:
        """Open reply streams and background work; once per worker, after fork."""
        if self.bus is not None:
            self.bus.start()
        self.usage.start()

    def stop(self) -> None:
        self.usage.stop()
        if self.bus is not None:
            self.bus.stop()

    def not_ready(self) -> list:
        """Names of the reply listeners readiness still waits for."""
        if self.bus is None or not self.settings.listener_required:
            return []
        return self.bus.disconnected()

    def run(self, run: RunRequest) -> dict:
        """Entitlement, then a usage record, then the run; no billing answer or no record means no run."""
        self.billing.check(run.owner_account_id)
        self.usage.record(usage_event(REQUESTED, run, {
            key: getattr(run, key) for key in ("profile", "timeout_seconds") if getattr(run, key) is not None}))
        metrics.run_started()
        try:
            result = check_owner(self.backend.run(run), run.owner_account_id)
        except Exception as exc:
            metrics.run_failed(exc)
            self.usage.record_later(usage_event(FAILED, run, {"reason": as_provider_error(exc).type}))
            raise
        metrics.run_finished(result.get("status") or ("succeeded" if result["exit_code"] == 0 else "failed"))
        self.usage.record_later(usage_event(FINISHED, run, {
            "duration_ms": result["duration_ms"], "exit_code": result["exit_code"], "image": result["image"]}))
        return result


def init_app(app, settings: Settings) -> Provider:
    bus = None
    if settings.uses_events:
        from .bus import Bus

        bus = Bus(settings)
    usage = {"none": NoUsage, "memory": MemoryUsage}.get(settings.usage_backend)
    usage = usage() if usage else EventsUsage(bus, settings.request_timeout)
    billing = EventsBilling(bus, settings.request_timeout) if settings.billing_backend == "events" else NoBilling()
    backend = create_backend(settings, bus)
    if bus is not None:
        bus.listen_for(*backend.reply_names, *usage.reply_names, *billing.reply_names)
    provider = Provider(settings, TokenVerifier(settings.jwt_secret), backend, usage, billing, bus)
    app.extensions["bus_containers"] = provider
    return provider
