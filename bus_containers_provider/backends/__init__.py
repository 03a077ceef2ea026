"""Container backends: one interface, one adapter per --backend value."""
from .base import Backend, RunRequest


def create_backend(settings, bus=None) -> Backend:
    if settings.backend == "events":
        from .events import EventsBackend

        return EventsBackend(bus, settings)
    from .static import StaticBackend

    return StaticBackend()


__all__ = ["Backend", "RunRequest", "create_backend"]
