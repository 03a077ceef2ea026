"""Deterministic in-memory backend for local checks: it executes nothing."""
import threading
from collections import OrderedDict

from ..errors import RunNotFound, Unavailable
from .base import Backend, RunRequest

RUNTIME = {"state": "ready", "provider": "static"}
# Local checks only, but a long-lived dev server must not grow without bound.
MAX_RUNS = 10_000


class StaticBackend(Backend):
    def __init__(self, max_runs: int = MAX_RUNS):
        self._runs = OrderedDict()
        self._lock = threading.Lock()
        self._max_runs = max_runs

    def status_items(self, account):
        with self._lock:
            items = [dict(item) for item in self._runs.values()]
        return [{"id": "static", "state": "ready"}] + items

    def start(self, request: RunRequest, correlation_id, on_reply):
        on_reply(self._run(request), None)

    def adopt(self, correlation_id, on_reply):
        # A static run is answered as it is handed over: one still running died with its process.
        on_reply(None, Unavailable("the process that ran this static run went away"))

    def result(self, reply, run_id):
        return reply

    def _run(self, request: RunRequest) -> dict:
        result = {
            "run_id": request.run_id,
            "owner_account_id": request.owner_account_id,
            "runner_name": "static",
            "image": request.image_label,
            "args": list(request.command),
            "exit_code": 0,
            "stdout": "",
            "stderr": "",
            "duration_ms": 0,
            "runtime": dict(RUNTIME),
        }
        item = {
            "id": request.run_id,
            "state": "finished",
            "owner_account_id": request.owner_account_id,
            "details": {"image": result["image"], "exit_code": 0},
        }
        with self._lock:
            self._runs[request.run_id] = item
            while len(self._runs) > self._max_runs:
                self._runs.popitem(last=False)
        return result

    def cancel(self, request: RunRequest):
        with self._lock:
            self._runs.pop(request.run_id, None)

    def delete(self, account, run_id):
        with self._lock:
            item = self._runs.get(run_id)
            # Another account's run is as unknown as a missing one, and stays.
            if item is None or item["owner_account_id"] != account:
                raise RunNotFound()
            del self._runs[run_id]
        return {"deleted": True, "run_id": run_id, "owner_account_id": account}

    def runner_status(self):
        return {"status": dict(RUNTIME, details={})}

    def runner_start(self):
        return {"accepted": True, "action": "start"}

    def runner_delete(self):
        return {"deleted": True}
