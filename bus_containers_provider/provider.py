"""The per-app parts: settings, token verifier, backend, usage, billing, Events bus."""
import logging
from dataclasses import dataclass, field
from typing import Optional

from .auth import TokenVerifier
from .backends import Backend, create_backend
from .backends.base import check_owner
from .config import Settings

log = logging.getLogger(__name__)


@dataclass
class Provider:
    settings: Settings
    verifier: TokenVerifier
    backend: Backend
    bus: Optional[object] = None
    _started: bool = field(default=False, repr=False)

    def start(self) -> None:
        if self.bus is not None and not self._started:
            self.bus.start()
        self._started = True

    def stop(self) -> None:
        if self.bus is not None and self._started:
            self.bus.stop()
        self._started = False

    def run(self, request) -> dict:
        """Delegate one run and refuse a result that names another owner."""
        return check_owner(self.backend.run(request), request.owner_account_id)

    def not_ready(self) -> list:
        """Names of the reply listeners readiness still waits for."""
        if self.bus is None or not self.settings.listener_required:
            return []
        return self.bus.disconnected()


def _reply_names(settings: Settings) -> list:
    from .backends import events
    from .bus import reply_name_for

    names = []
    if settings.backend == "events":
        names += [reply_name_for(name) for name in events.REQUESTS]
    return names


def init_app(app, settings: Settings) -> Provider:
    bus = None
    if settings.uses_events:
        from .bus import Bus

        bus = Bus(settings, _reply_names(settings))
    provider = Provider(settings, TokenVerifier(settings.jwt_secret), create_backend(settings, bus), bus)
    app.extensions["bus_containers"] = provider
    return provider
