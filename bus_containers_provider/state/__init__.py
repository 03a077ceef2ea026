"""What provider processes must agree on (idempotency records, account run slots), behind one interface."""
from .base import Claim, StateStore


def create_store(settings) -> StateStore:
    """The in-process store, or the Redis one when --state-url is set."""
    if settings.state_url:
        from .redis import RedisStore

        return RedisStore(settings.state_url)
    from .memory import MemoryStore

    return MemoryStore()


__all__ = ["Claim", "StateStore", "create_store"]
