"""Runs held in flight by a test: started in a thread, answered by the test as the worker would."""
import re
import threading
import time

import requests

from conftest import WORKER_TOKEN, bearer

RUNS = "/api/v1/containers/runs"
RUN_REQUEST = "bus.containers.run.request"
RUN_REPLY = "bus.containers.run.response"
CAUGHT_UP = re.compile(r"caught up on \S+: (\d+) of (\d+) waiting replies found")


def start_run(client, account="acct-a", profile="never", timeout_seconds=30):
    """POST a run in a thread; returns (thread, box) where box["response"] is set when it answers."""
    box = {}

    def post():
        box["response"] = client.post(RUNS, headers=bearer(account), json={
            "profile": profile, "args": ["echo", account], "timeout_seconds": timeout_seconds})

    thread = threading.Thread(target=post, daemon=True)
    thread.start()
    return thread, box


def reply_as_worker(server, request, stdout="done"):
    """Publish the worker's reply to a stored run request, the way the containers worker does."""
    payload = request["payload"]
    result = {"run_id": payload["run_id"], "owner_account_id": payload["owner_account_id"], "runner_name": "worker",
              "image": "alpine", "args": payload["command"], "exit_code": 0, "stdout": stdout, "stderr": "",
              "duration_ms": 1, "runtime": {"state": "ready", "provider": "worker"}}
    response = requests.post(f"{server.url}/api/v1/events", timeout=5, headers={
        "Authorization": f"Bearer {WORKER_TOKEN}"}, json={
        "name": RUN_REPLY, "correlationId": request["correlationId"], "payload": result})
    assert response.status_code == 202


def wait_until(condition, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout}s"
        time.sleep(0.02)


def caught_up(caplog):
    """(found, waiting) summed over every catch-up logged so far."""
    counts = [tuple(map(int, m.groups())) for m in CAUGHT_UP.finditer(caplog.text)]
    return sum(c[0] for c in counts), sum(c[1] for c in counts)
