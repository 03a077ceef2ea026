"""`make soak`: a bounded chaos run of the whole provider against the in-repo Events API.

Two provider processes (2 workers each) share one redis-server and the test
Events API; integration work comes from the test responder. On a schedule the
Events API is restarted (down a few seconds, history kept), a gunicorn worker
is killed with SIGKILL, and a whole provider is restarted. Clients retry every
failure with the same Idempotency-Key, alternating between the providers. At
the end it prints runs executed twice, runs without a final answer, usage
records missing or doubled, and every answer by status.

Only 127.0.0.1 is used. SOAK_SECONDS (default 120) bounds the chaos; clients
then get up to 90 s to finish their last runs.
"""
import collections
import logging
import concurrent.futures
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import EVENTS_TOKEN, WORKER_TOKEN, bearer  # noqa: E402
from eventsapi import EventsServer, Responder  # noqa: E402
from processes import SCRIPT, free_port, provider_env, wait_ready  # noqa: E402
from redisserver import RedisServer  # noqa: E402

RUNS = "/api/v1/containers/runs"
RUN = "bus.containers.run.request"
ACCOUNTS = [f"soak-{n}" for n in range(6)]
CLIENTS = 12
RUN_DEADLINE = 90.0  # a logical run that has no final answer by then is reported


class Provider:
    """One provider process (console script) on a fixed port, restartable."""

    def __init__(self, events_url, state_url, log_dir):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._args = [str(SCRIPT), "--addr", f"127.0.0.1:{self.port}", "--backend", "events",
                      "--events-url", events_url, "--usage-backend", "events", "--state-url", state_url,
                      "--workers", "2", "--threads", "32"]
        self._env = provider_env(BUS_API_TOKEN=EVENTS_TOKEN, BUS_EVENTS_LISTENER_RETRY="1",
                                 BUS_EVENTS_LISTENER_RETRY_MIN="100ms", BUS_EVENTS_LISTENER_RETRY_MAX="1s",
                                 BUS_EVENTS_LISTENER_REQUIRED="1", BUS_CONTAINERS_SHUTDOWN_GRACE="20s",
                                 BUS_CONTAINERS_RUN_TIMEOUT_GRACE="15s", BUS_CONTAINERS_MAX_RUNS_PER_ACCOUNT="8")
        self._log = open(Path(log_dir) / f"provider-{self.port}.log", "a")
        self.process = None

    def start(self):
        self.process = subprocess.Popen(self._args, env=self._env, cwd=ROOT, stdout=self._log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        self.process.log = lambda: ""
        wait_ready(self.url, self.process, timeout=30)

    def stop(self):
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)

    def kill_a_worker(self):
        children = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True)
        pids = [int(p) for p in children.stdout.split()]
        if pids:
            os.kill(random.choice(pids), signal.SIGKILL)


def one_run(providers, stop_at, answers):
    """One logical run: retried with its key until it has a final answer or its deadline passes."""
    account = random.choice(ACCOUNTS)
    nonce = uuid.uuid4().hex
    body = {"profile": f"sleep:{random.uniform(0.2, 3.0):.2f}", "args": ["soak", nonce], "timeout_seconds": 20}
    headers = dict(bearer(account, "container:read container:run"), **{"Idempotency-Key": nonce})
    deadline = time.monotonic() + RUN_DEADLINE
    attempt = 0
    while time.monotonic() < deadline:
        provider = providers[attempt % len(providers)]
        attempt += 1
        try:
            response = requests.post(provider.url + RUNS, json=body, headers=headers, timeout=60)
        except requests.RequestException as exc:
            answers[type(exc).__name__] += 1
            time.sleep(0.5)
            continue
        answers[response.status_code] += 1
        if response.status_code == 200:
            result = response.json()
            ok = result["owner_account_id"] == account and result["stdout"] == f"soak {nonce}"
            return nonce, result["run_id"], ok
        if response.headers.get("Idempotent-Replayed") == "true":
            answers["remembered error"] += 1
            return nonce, None, False  # the key's remembered answer: retrying cannot change it
        if response.status_code < 500 and response.status_code not in (409, 429):
            return nonce, None, False  # a final refusal
        time.sleep(min(float(response.headers.get("Retry-After", "1")), 5.0))
    return nonce, None, False


def chaos(events, providers, stop_at, log):
    """Restart the Events API, kill a worker, restart a provider, on a schedule."""
    step = 0
    while time.monotonic() < stop_at:
        time.sleep(10)
        step += 1
        if step % 3 == 1:
            log.append(f"{time.strftime('%X')} Events API down for 5 s")
            events.stop()
            time.sleep(5)
            events.start()
        elif step % 3 == 2:
            log.append(f"{time.strftime('%X')} SIGKILL a worker of provider 1")
            providers[0].kill_a_worker()
        else:
            log.append(f"{time.strftime('%X')} restart provider 2")
            providers[1].stop()
            providers[1].start()


def main() -> int:
    logging.basicConfig(level=logging.ERROR)  # the chaos makes the test servers' warnings expected
    seconds = float(os.environ.get("SOAK_SECONDS", "120"))
    log_dir = Path(os.environ.get("SOAK_LOG_DIR", "/tmp/bus-containers-soak"))
    log_dir.mkdir(parents=True, exist_ok=True)
    events = EventsServer(tokens={EVENTS_TOKEN: None, WORKER_TOKEN: None}).start()
    store = RedisServer().start()
    responder = Responder(events.url, WORKER_TOKEN).start()
    providers = [Provider(events.url, store.url, log_dir) for _ in range(2)]
    for provider in providers:
        provider.start()
    answers = collections.Counter()
    outcomes, events_log = [], []
    stop_at = time.monotonic() + seconds
    started = time.monotonic()
    try:
        chaos_thread = threading.Thread(target=chaos, args=(events, providers, stop_at, events_log), daemon=True)
        chaos_thread.start()
        with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
            def client():
                while time.monotonic() < stop_at:
                    outcomes.append(one_run(providers, stop_at, answers))

            for future in [pool.submit(client) for _ in range(CLIENTS)]:
                future.result()
        chaos_thread.join(30)
        time.sleep(5)  # the last finished records are sent after their answers
    finally:
        for provider in providers:
            provider.stop()
        responder.stop()
        store.stop()
        events.stop()
    report(outcomes, answers, responder, events_log, time.monotonic() - started)
    return 0


def report(outcomes, answers, responder, events_log, elapsed):
    executions = collections.Counter()
    for request in responder.received(RUN):
        args = (request.get("payload") or {}).get("command") or []
        if len(args) == 2 and args[0] == "soak":
            executions[args[1]] += 1
    finished = collections.defaultdict(set)
    deliveries = collections.Counter()
    for record in responder.usage_records:
        if record.get("event_type") == "container_run_finished":
            finished[record["data"]["run_id"]].add(record["event_id"])
            deliveries[record["event_id"]] += 1
    answered = [(nonce, run_id) for nonce, run_id, ok in outcomes if run_id]
    rows = [
        ("logical runs", len(outcomes)),
        ("answered 200 with their own result", sum(1 for _, run_id, ok in outcomes if run_id and ok)),
        ("answered 200 with a wrong result", sum(1 for _, run_id, ok in outcomes if run_id and not ok)),
        ("without a final answer", sum(1 for _, run_id, _ in outcomes if not run_id)),
        ("executed twice or more", sum(1 for nonce, _, _ in outcomes if executions[nonce] > 1)),
        ("answered, container_run_finished missing", sum(1 for _, run_id in answered if not finished[run_id])),
        ("answered, container_run_finished doubled", sum(1 for _, run_id in answered if len(finished[run_id]) > 1)),
        ("finished records delivered more than once (same event_id)", sum(1 for n in deliveries.values() if n > 1)),
    ]
    print(f"\nsoak: {elapsed:.0f} s, {CLIENTS} clients, 2 providers x 2 workers, one redis-server")
    for line in events_log:
        print(f"  {line}")
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print("answers by status: " + ", ".join(f"{k}: {v}" for k, v in sorted(answers.items(), key=str)))


if __name__ == "__main__":
    sys.exit(main())
