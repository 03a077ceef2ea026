"""The backend interface every container backend implements."""
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

from ..errors import OwnerMismatch, RunNotFound


@dataclass(frozen=True)
class RunRequest:
    """A validated run, owned by the caller's account."""

    run_id: str
    owner_account_id: str
    command: List[str]
    profile: Optional[str] = None
    image: Optional[str] = None
    timeout_seconds: Optional[int] = None
    # Passed to the backend and nowhere else: never in a repr, a log line or a record.
    env: Optional[Dict[str, str]] = field(default=None, repr=False)
    stdin: Optional[str] = field(default=None, repr=False)

    @property
    def image_label(self) -> str:
        return self.image or f"profile:{self.profile}"

    @property
    def body(self) -> dict:
        """The validated request body, as the Idempotency-Key fingerprint sees it."""
        return {k: v for k, v in asdict(self).items() if v is not None and k not in ("run_id", "owner_account_id")}


def _never() -> Optional[str]:
    return None


@dataclass
class Watch:
    """What the run flow learns while a backend carries a run out, and how it asks it to stop.

    `published` turns true once the run was handed over (from then on the run
    may execute, so its answer is remembered); `cancelled` returns a reason
    once nobody waits for the result any more.
    """

    cancelled: Callable[[], Optional[str]] = _never
    published: bool = False

    def mark_published(self) -> None:
        self.published = True


class Backend:
    """Status, runs and runner lifecycle; results are plain dicts in the reply schemas' shapes."""

    reply_names = ()  # Events reply streams the backend needs

    def status_items(self, account: str) -> list:
        """Every status item the backend reports for `account` (unfiltered)."""
        raise NotImplementedError

    def run(self, request: RunRequest, watch: Watch) -> dict:
        """The run's result (a run reply's fields); `watch.mark_published()` once it is handed over."""
        raise NotImplementedError

    def cancel(self, request: RunRequest) -> None:
        """Ask for a run nobody waits for any more to be stopped; never waits for an answer."""
        raise NotImplementedError

    def delete(self, account: str, run_id: str) -> dict:
        raise NotImplementedError

    def runner_status(self) -> dict:
        raise NotImplementedError

    def runner_start(self) -> dict:
        raise NotImplementedError

    def runner_delete(self) -> dict:
        raise NotImplementedError

    # Everything below is policy shared by all backends.

    def status(self, account: str) -> list:
        """The caller's items, and unowned (shared) items reduced to id and state."""
        visible = []
        for item in self.status_items(account):
            owner = item.get("owner_account_id")
            if owner is None:
                visible.append({"id": item["id"], "state": item["state"]})
            elif owner == account:
                visible.append(item)
        return visible

    def runs(self, account: str) -> list:
        return [item for item in self.status(account) if item.get("owner_account_id") == account]

    def get_run(self, account: str, run_id: str) -> dict:
        for item in self.runs(account):
            if item["id"] == run_id:
                return item
        # Another account's run reads as unknown: no existence leak.
        raise RunNotFound()


def check_owner(result: dict, account: str) -> dict:
    """Refuse a backend result that names another owner; its content is never shown."""
    if result.get("owner_account_id") != account:
        raise OwnerMismatch()
    return result
