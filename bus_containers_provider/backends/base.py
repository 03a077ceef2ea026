"""The backend interface every container backend implements."""
from dataclasses import dataclass
from typing import List, Optional

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

    @property
    def image_label(self) -> str:
        return self.image or f"profile:{self.profile}"


class Backend:
    """Status, runs and runner lifecycle; results are plain dicts in the reply schemas' shapes."""

    reply_names = ()  # Events reply streams the backend needs

    def status_items(self, account: str) -> list:
        """Every status item the backend reports for `account` (unfiltered)."""
        raise NotImplementedError

    def run(self, request: RunRequest) -> dict:
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
