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


# How a backend hands a run's reply over: (reply, None), or (None, the error that ended the wait).
OnReply = Callable[[Optional[dict], Optional[Exception]], None]


class Backend:
    """Status, runs and runner lifecycle; results are plain dicts in the reply schemas' shapes."""

    reply_names = ()  # Events reply streams the backend needs

    def status_items(self, account: str) -> list:
        """Every status item the backend reports for `account` (unfiltered)."""
        raise NotImplementedError

    def start(self, request: RunRequest, correlation_id: str, on_reply: OnReply):
        """Hand the run over under `correlation_id`; `on_reply` is called once, maybe before this returns.

        Returns a handle on the wait for the reply. Raises (and hands nothing
        over) when the run could not be handed over.
        """
        raise NotImplementedError

    def adopt(self, correlation_id: str, on_reply: OnReply):
        """Wait for the reply to a run another process handed over; never hands it over again."""
        raise NotImplementedError

    def result(self, reply: dict, run_id: str) -> dict:
        """The run result a reply carries (a run reply's fields); 502 when it is malformed."""
        raise NotImplementedError

    def watch(self, handle, cancelled: Callable[[], Optional[str]]) -> None:
        """End the wait with RunCancelled once `cancelled` returns a reason."""

    def unwatch(self, handle) -> None:
        """Stop asking `cancelled`."""

    def release(self, handle) -> None:
        """The wait is over, on every path."""

    def can_adopt(self) -> bool:
        """Whether a reply to an adopted run could reach this process now."""
        return True

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
