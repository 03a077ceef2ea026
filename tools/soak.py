"""`make soak`: a bounded chaos run of the whole provider, checking that every run completes exactly once.

Two provider processes (2 workers each) share one redis-server with an
append-only file and the in-repo Events API; integration work comes from the
test responder. Two kinds of client run side by side, each logical run under
its own Idempotency-Key, retried with that key on every non-final answer and
alternating between the providers:

- foreground clients post a run and wait for its 200;
- detached clients post it with `Prefer: respond-async` (CONTRACT §9; a
  quarter also ask `wait=2`), then collect it from the run record, half by
  polling `GET /runs/{run_id}` (honouring `Retry-After`, capped) and half by
  `Prefer: wait=N` long-polls, until the item is `finished` with its result
  (or error).

Every result must be the client's own (owner, run id, stdout echoing its
nonce). On a schedule, one fault every 10 s: the Events API down 5 s (history
kept), a worker SIGKILLed, Redis restarted (its data kept), a provider
SIGTERMed and restarted, a whole provider SIGKILLed (process group) and
restarted, so that runs in flight are adopted by the other process.

The report is one table. Targets: no logical run executed twice, no run
request published twice, no detached run left unfinished, no foreground run
without a final answer, one `container_run_finished` per answered run (distinct
event_id), a finished or failed usage record for every executed run, no
crossed result, no answer the contract does not allow, every fault carried
out. The exit status is non-zero when any target is missed.

Only 127.0.0.1 is used. SOAK_SECONDS (default 120) bounds the chaos; runs in
flight then get up to RUN_DEADLINE to finish, usage records up to USAGE_SETTLE
to arrive. Logs go to SOAK_LOG_DIR (default /tmp/bus-containers-soak):
provider-1.log, provider-2.log, and soak-runs.jsonl (every logical run with
every attempt), soak-faults.log, soak-evidence.txt (each missed target's runs).
SOAK_APPENDONLY=no runs Redis without its append-only file, to show what a
store without persistence loses on a restart. SIGTERM or SIGINT ends it early,
without a report, after stopping every process it started.
"""
import collections
import concurrent.futures
import dataclasses
import json
import logging
import os
import random
import re
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
FINISHED, FAILED = "container_run_finished", "container_run_failed"
ACCOUNTS = [f"soak-{n}" for n in range(6)]
FOREGROUND_CLIENTS = 12
DETACHED_CLIENTS = 8
FAULT_EVERY = 10.0
# Adoption after a whole provider dies may take up to 60 s (§9), on top of the run itself
# and an Events API outage: a logical run without a final answer by then is reported.
RUN_DEADLINE = 180.0
USAGE_SETTLE = 60.0
RETRY_AFTER_CAP = 3.0  # a poller honours Retry-After up to this, so a long hint cannot eat its deadline
LONGEST_WAIT = 15  # the largest `Prefer: wait=N` a client asks; under the provider's default --max-wait
RUN_TIMEOUT = 20  # the runs' timeout_seconds; with the provider's 15 s grace, a run waits at most 35 s
# A submission may wait for its container_run_requested record (--request-timeout, 30 s) before it
# publishes; a foreground run then waits its 35 s. Past these bounds an answer counts as a client timeout.
FOREGROUND_HTTP_TIMEOUT = 90.0
SUBMIT_HTTP_TIMEOUT = 45.0
READ_HTTP_TIMEOUT = 15.0  # a read is answered from the record, with nothing to wait for but a Prefer: wait


class Provider:
    """One provider process (console script) on a fixed port, restartable."""

    def __init__(self, number, events_url, state_url, log_dir):
        self.number = number
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._args = [str(SCRIPT), "--addr", f"127.0.0.1:{self.port}", "--backend", "events",
                      "--events-url", events_url, "--usage-backend", "events", "--state-url", state_url,
                      "--workers", "2", "--threads", "32"]
        self._env = provider_env(BUS_API_TOKEN=EVENTS_TOKEN, BUS_EVENTS_LISTENER_RETRY="1",
                                 BUS_EVENTS_LISTENER_RETRY_MIN="100ms", BUS_EVENTS_LISTENER_RETRY_MAX="1s",
                                 BUS_EVENTS_LISTENER_REQUIRED="1", BUS_CONTAINERS_SHUTDOWN_GRACE="20s",
                                 BUS_CONTAINERS_RUN_TIMEOUT_GRACE="15s", BUS_CONTAINERS_MAX_RUNS_PER_ACCOUNT="8")
        self.log_path = Path(log_dir) / f"provider-{number}.log"
        self._log = open(self.log_path, "w")
        self.process = None

    def start(self):
        self._log.write(f"--- soak: provider {self.number} starting at {time.strftime('%X')}\n")
        self._log.flush()
        self.process = subprocess.Popen(self._args, env=self._env, cwd=ROOT, stdout=self._log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        self.process.log = lambda: f"see {self.log_path}"
        wait_ready(self.url, self.process, timeout=30)

    def stop(self):
        """SIGTERM to the process group: the provider drains within its shutdown grace."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)

    def kill(self):
        """SIGKILL to the master and every worker at once: nothing drains, leases are left to lapse."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)

    def kill_a_worker(self):
        children = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True,
                                  timeout=5)
        pids = [int(p) for p in children.stdout.split()]
        if not pids:
            raise RuntimeError(f"provider {self.number} has no worker to kill")
        os.kill(random.choice(pids), signal.SIGKILL)

    def close(self):
        self.stop()
        self._log.close()


@dataclasses.dataclass
class LogicalRun:
    """One run as its client sees it, across every attempt; what the report and the evidence are made of."""

    kind: str  # "foreground" or "detached"
    account: str
    nonce: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    run_id: str = None  # from the first answer that named it
    outcome: str = None  # "result", "error" (a final error answer), or None (no final answer)
    own: bool = None  # the result was this run's: owner, run id, stdout
    collected_by: str = None  # detached: "submission", "poll" or "wait"
    wrong: dict = None  # a result that was not this run's, as evidence (its output cut short)
    # Each attempt: [seconds into the soak when its answer came, call, provider, status].
    attempts: list = dataclasses.field(default_factory=list)
    started: float = dataclasses.field(default_factory=time.monotonic)
    body: dict = None

    def __post_init__(self):
        # Fixed once: every retry must send the same body, or its key would answer 422.
        self.body = {"profile": f"sleep:{random.uniform(0.2, 3.0):.2f}", "args": ["soak", self.nonce],
                     "timeout_seconds": RUN_TIMEOUT}

    def headers(self, **extra):
        return {**bearer(self.account, "container:read container:run"), "Idempotency-Key": self.nonce, **extra}

    def take_result(self, result):
        self.outcome = "result"
        self.run_id = self.run_id or result.get("run_id")
        self.own = (result.get("owner_account_id") == self.account and result.get("run_id") == self.run_id
                    and result.get("stdout") == f"soak {self.nonce}")
        if not self.own:
            self.wrong = {k: (v[:200] if isinstance(v, str) else v) for k, v in result.items()}


class Answers:
    """Every answer, tallied by kind of call and status, and each one the contract does not allow."""

    def __init__(self, started):
        self._lock = threading.Lock()
        self._started = started
        self.by_kind = collections.defaultdict(collections.Counter)
        self.strays = []  # (seconds, kind, provider, status, why, nonce, body excerpt)
        self.timeouts = 0

    def note(self, run, kind, provider, outcome, why=None):
        """Record one call's outcome: a response, or the exception that stood for it."""
        seconds = round(time.monotonic() - self._started, 1)
        status = outcome.status_code if isinstance(outcome, requests.Response) else type(outcome).__name__
        run.attempts.append([seconds, kind, provider.number, status])
        with self._lock:
            self.by_kind[kind][status] += 1
            if isinstance(outcome, requests.Timeout):
                self.timeouts += 1
            if why:
                excerpt = outcome.text[:300] if isinstance(outcome, requests.Response) else ""
                self.strays.append((seconds, kind, provider.number, status, why, run.nonce, excerpt))


def json_of(response):
    """The body as JSON, or {} when it is not: a stray body is reported, it must not stop a client."""
    try:
        return response.json()
    except ValueError:
        return {}


def retry_after(response, default=1.0):
    value = response.headers.get("Retry-After", "")
    return min(float(value), RETRY_AFTER_CAP) if value.isdigit() else default


def whole_seconds(value):
    return value is not None and value.isdigit() and int(value) >= 1


def stray(kind, response, run, asked_wait=None):
    """Why `response` is not an answer the contract allows for this call, or None."""
    status = response.status_code
    allowed = {"POST foreground": {200, 409, 429, 503}, "POST detached": {200, 202, 409, 429, 503},
               "GET poll": {200, 503}, "GET wait": {200, 503}}[kind]
    if status not in allowed:
        return f"{status} is not among the answers this call may get ({sorted(allowed)})"
    if status in (409, 429, 503) and not whole_seconds(response.headers.get("Retry-After")):
        return f"{status} without Retry-After in whole seconds"
    try:
        body = response.json()
    except ValueError:
        return "a body that is not JSON"
    if status >= 400:
        error = body.get("error") if isinstance(body, dict) else None
        return None if isinstance(error, dict) and error.get("type") and error.get("message") \
            else "not the error envelope"
    if kind == "POST detached" and status == 200 and asked_wait is None and not run.attempts:
        return "a foreground 200 for a first respond-async submission without wait"
    if kind == "POST detached" and status == 202:
        return stray_accepted(response, body, run)
    if kind.startswith("GET"):
        return stray_item(response, body, run, asked_wait)
    return None


def stray_accepted(response, body, run):
    run_id = body.get("id") if isinstance(body, dict) else None
    if not run_id:
        return "202 without the run's item"
    if run.run_id and run_id != run.run_id:
        return f"202 names {run_id}, an earlier answer to the same key named {run.run_id}"
    if response.headers.get("Location", "").rpartition("/")[2] != run_id:
        return f"202 Location {response.headers.get('Location')!r} does not name {run_id}"
    if "respond-async" not in response.headers.get("Preference-Applied", ""):
        return "202 without Preference-Applied: respond-async"
    if not whole_seconds(response.headers.get("Retry-After")):
        return "202 without Retry-After in whole seconds"
    if body.get("owner_account_id") not in (None, run.account):
        return "202 item of another owner"
    return None


def stray_item(response, body, run, asked_wait):
    if not isinstance(body, dict) or body.get("id") != run.run_id or body.get("owner_account_id") != run.account:
        return "an item that is not this run's"
    if body.get("state") == "running" and not whole_seconds(response.headers.get("Retry-After")):
        return "a running item without Retry-After"
    if body.get("state") == "finished" and not isinstance(body.get("result") or body.get("error"), dict):
        return "a finished item without result or error"
    if body.get("state") not in ("running", "finished"):
        return f"state {body.get('state')!r}"
    applied = re.fullmatch(r"wait=(\d+)", response.headers.get("Preference-Applied", "wait=0").strip())
    if asked_wait is not None and (applied is None or int(applied.group(1)) > asked_wait):
        return f"Preference-Applied {response.headers.get('Preference-Applied')!r} for wait={asked_wait}"
    return None


class Client:
    """One client thread's calls: a requests Session of its own, every call bounded and tallied."""

    def __init__(self, providers, answers, deadline_of):
        self.providers = providers
        self.answers = answers
        self.deadline_of = deadline_of
        self.session = requests.Session()
        self._turn = random.randrange(len(providers))

    def next_provider(self):
        # Alternating: a retry lands on the other process, the one that did not fail it.
        self._turn += 1
        return self.providers[self._turn % len(self.providers)]

    def call(self, run, kind, method, path, timeout, asked_wait=None, **kwargs):
        """One request to the next provider; the response, or None after a transport failure."""
        provider = self.next_provider()
        try:
            response = self.session.request(method, provider.url + path, timeout=timeout, **kwargs)
        except requests.RequestException as exc:
            self.answers.note(run, kind, provider, exc)
            time.sleep(0.5)
            return None
        self.answers.note(run, kind, provider, response, stray(kind, response, run, asked_wait))
        return response

    def foreground(self, run):
        """Post until a final answer: a 200, or an error that retrying cannot change."""
        while time.monotonic() < self.deadline_of(run):
            response = self.call(run, "POST foreground", "POST", RUNS, FOREGROUND_HTTP_TIMEOUT,
                                 json=run.body, headers=run.headers())
            if response is None:
                continue
            if response.status_code == 200:
                return run.take_result(json_of(response))
            if response.headers.get("Idempotent-Replayed") == "true" or response.status_code not in (409, 429, 503):
                run.outcome = "error"  # the key's remembered answer, or a refusal: retrying cannot change it
                return
            time.sleep(retry_after(response))

    def detached(self, run):
        """Submit until accepted, then collect from the run record by polling or by long-polls."""
        submit_wait = 2 if random.random() < 0.25 else None
        prefer = "respond-async" + (f", wait={submit_wait}" if submit_wait else "")
        how = "wait" if random.random() < 0.5 else "poll"
        while run.run_id is None and time.monotonic() < self.deadline_of(run):
            response = self.call(run, "POST detached", "POST", RUNS, SUBMIT_HTTP_TIMEOUT + (submit_wait or 0),
                                 asked_wait=submit_wait, json=run.body, headers=run.headers(Prefer=prefer))
            if response is None:
                continue
            if response.status_code == 200:
                run.collected_by = "submission"
                return run.take_result(json_of(response))
            if response.status_code == 202:
                run.run_id = json_of(response).get("id")
                if how == "poll":
                    time.sleep(retry_after(response))
            elif response.headers.get("Idempotent-Replayed") == "true" or response.status_code not in (409, 429, 503):
                run.outcome = "error"
                return
            else:
                time.sleep(retry_after(response))
        self.collect(run, how)

    def collect(self, run, how):
        headers = {k: v for k, v in run.headers().items() if k != "Idempotency-Key"}
        while run.run_id and time.monotonic() < self.deadline_of(run):
            if how == "wait":
                wait = random.randint(2, LONGEST_WAIT)
                response = self.call(run, "GET wait", "GET", f"{RUNS}/{run.run_id}", wait + READ_HTTP_TIMEOUT,
                                     asked_wait=wait, headers=dict(headers, Prefer=f"wait={wait}"))
            else:
                response = self.call(run, "GET poll", "GET", f"{RUNS}/{run.run_id}", READ_HTTP_TIMEOUT,
                                     headers=headers)
            if response is None:
                continue
            item = json_of(response) if response.status_code == 200 else {}
            if item.get("state") == "finished" and item.get("id") == run.run_id:
                if isinstance(item.get("result"), dict):
                    run.collected_by = how
                    return run.take_result(item["result"])
                if isinstance(item.get("error"), dict):
                    run.collected_by, run.outcome = how, "error"
                    return
            # Anything else is read again until the deadline: a wrong answer (a 404, a finished item
            # without its result) is already noted as a stray; going on tells whether the run was lost.
            # A long-poll that was granted its wait is sent again at once; one answered at once
            # (no capacity to hold it) honours Retry-After like a poll, so it cannot spin.
            granted = "wait=" in response.headers.get("Preference-Applied", "")
            if how == "poll" or response.status_code != 200 or not granted:
                time.sleep(retry_after(response))

    def close(self):
        self.session.close()


class Chaos:
    """One fault every FAULT_EVERY seconds until told to stop, in a fixed order; each logged with its time."""

    def __init__(self, events, store, providers, started, log_path):
        self.events, self.store, self.providers = events, store, providers
        self.started = started
        self.log = []
        self.done = collections.Counter()
        self.failed = []
        self._log_file = open(log_path, "w")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="soak-chaos", daemon=True)

    def start(self, stop_at):
        self._stop_at = stop_at
        self._thread.start()

    def join(self, timeout):
        self._stop.set()
        if self._thread.ident is not None:  # not started when the soak was stopped during start-up
            self._thread.join(timeout)
        self._log_file.close()

    def _schedule(self, cycle):
        one, two = self.providers[cycle % 2], self.providers[(cycle + 1) % 2]
        return [
            ("Events API restart", "Events API down 5 s (history kept)", self._events_down),
            ("worker SIGKILL", f"SIGKILL a worker of provider {one.number}", one.kill_a_worker),
            ("Redis restart", "Redis restarted, down 2 s", lambda: self.store.restart(down=2)),
            ("provider SIGTERM", f"provider {two.number}: SIGTERM, drain, restart", lambda: self._restart(two)),
            ("worker SIGKILL", f"SIGKILL a worker of provider {two.number}", two.kill_a_worker),
            ("provider SIGKILL", f"provider {one.number}: SIGKILL to the process group, restart",
             lambda: self._restart(one, kill=True)),
        ]

    def _loop(self):
        cycle = 0
        while True:
            for fault, text, act in self._schedule(cycle):
                if self._stop.wait(max(0.0, min(FAULT_EVERY, self._stop_at - time.monotonic()))) \
                        or time.monotonic() >= self._stop_at:
                    return
                self._say(text)
                try:
                    act()
                    self.done[fault] += 1
                except Exception as exc:  # a fault not carried out makes the soak prove less: reported
                    self.failed.append(f"{fault}: {exc}")
                    self._say(f"  FAILED: {exc!r}")
            cycle += 1

    def _say(self, text):
        line = f"{time.strftime('%X')} (+{time.monotonic() - self.started:5.1f} s) {text}"
        self.log.append(line)
        self._log_file.write(line + "\n")
        self._log_file.flush()

    def _events_down(self):
        self.events.stop()
        time.sleep(5)
        self.events.start()

    def _restart(self, provider, kill=False):
        provider.kill() if kill else provider.stop()
        provider.start()
        self._say(f"  provider {provider.number} ready again")


class Interrupted(Exception):
    """SIGTERM or SIGINT: the soak ends early, and still stops every process it started."""


def interrupt(signum, frame):
    # The providers run in sessions of their own, so a signal to the soak's process group never
    # reaches them: unless the soak stops them itself, they outlive it. A second signal is ignored
    # so that it cannot cut that cleanup short.
    for each in (signal.SIGTERM, signal.SIGINT):
        signal.signal(each, signal.SIG_IGN)
    raise Interrupted(signal.Signals(signum).name)


def main() -> int:
    logging.basicConfig(level=logging.ERROR)  # the chaos makes the test servers' warnings expected
    for each in (signal.SIGTERM, signal.SIGINT):
        signal.signal(each, interrupt)
    seconds = float(os.environ.get("SOAK_SECONDS", "120"))
    log_dir = Path(os.environ.get("SOAK_LOG_DIR", "/tmp/bus-containers-soak"))
    log_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    events = EventsServer(tokens={EVENTS_TOKEN: None, WORKER_TOKEN: None}).start()
    appendonly = os.environ.get("SOAK_APPENDONLY", "yes") != "no"
    store = RedisServer(appendonly=appendonly, appendfsync="always").start()
    responder = Responder(events.url, WORKER_TOKEN).start()
    providers = [Provider(n, events.url, store.url, log_dir) for n in (1, 2)]
    answers = Answers(started)
    runs, harness_errors = [], []
    stop_at = started + seconds
    chaos = Chaos(events, store, providers, started, log_dir / "soak-faults.log")
    aborted = threading.Event()
    pool = concurrent.futures.ThreadPoolExecutor(FOREGROUND_CLIENTS + DETACHED_CLIENTS)

    def client(kind):
        calls = Client(providers, answers, lambda run: 0 if aborted.is_set() else run.started + RUN_DEADLINE)
        try:
            while time.monotonic() < stop_at and not aborted.is_set():
                run = LogicalRun(kind, random.choice(ACCOUNTS))
                runs.append(run)
                try:
                    getattr(calls, kind)(run)
                except Exception:  # the soak's own fault: shown, counted, and the client goes on
                    logging.exception("soak client failed on run %s", run.nonce)
                    harness_errors.append(run)
        finally:
            calls.close()

    try:
        for provider in providers:
            provider.start()
        chaos.start(stop_at)
        kinds = ["foreground"] * FOREGROUND_CLIENTS + ["detached"] * DETACHED_CLIENTS
        for future in [pool.submit(client, kind) for kind in kinds]:
            future.result()
        settle_usage(responder, events)
    except Interrupted as signal_name:
        print(f"soak: stopped by {signal_name} after {time.monotonic() - started:.0f} s; no report", file=sys.stderr)
        return 1
    finally:
        aborted.set()  # clients end after the call in hand, which every timeout bounds
        pool.shutdown(wait=False, cancel_futures=True)
        chaos.join(60)
        for provider in providers:
            provider.close()
        responder.stop()
        store.close()
        events.stop()
    rows, evidence = report(runs, answers, events, responder, chaos, harness_errors)
    rows.insert(5, ("runs adopted by a process that did not publish them (provider logs)",
                    sum(log_lines(provider.log_path, "adopting run") for provider in providers), "", True))
    write_logs(log_dir, runs, evidence)
    print_table(rows, chaos, answers, time.monotonic() - started, log_dir, seconds, appendonly)
    return 0 if all(met for *_, met in rows) else 1


def settle_usage(responder, events):
    """Wait, bounded, until every published run has its finished or failed usage record (they follow answers)."""
    deadline = time.monotonic() + USAGE_SETTLE
    while time.monotonic() < deadline:
        recorded = {r["data"].get("run_id") for r in list(responder.usage_records)
                    if r.get("event_type") in (FINISHED, FAILED)}
        if all(e["payload"].get("run_id") in recorded for e in events.published(RUN)):
            return
        time.sleep(0.5)


def report(runs, answers, events, responder, chaos, harness_errors):
    """The table's rows (name, value, target, met) and, per missed target, the runs that missed it."""
    published = collections.defaultdict(list)  # nonce -> the run request envelopes stored by the Events API
    for envelope in events.published(RUN):
        command = envelope["payload"].get("command") or []
        if len(command) == 2 and command[0] == "soak":
            published[command[1]].append({"id": envelope["id"], "at": envelope.get("createdAt"),
                                          "run_id": envelope["payload"].get("run_id"),
                                          "correlation": envelope.get("correlationId")})
    executed = collections.defaultdict(set)  # nonce -> distinct envelopes the integration received
    for envelope in responder.received(RUN):
        command = (envelope.get("payload") or {}).get("command") or []
        if len(command) == 2 and command[0] == "soak":
            executed[command[1]].add(envelope.get("id"))
    usage = collections.defaultdict(lambda: collections.defaultdict(set))  # run_id -> event_type -> event_ids
    deliveries = collections.Counter()
    for record in list(responder.usage_records):
        usage[record["data"].get("run_id")][record.get("event_type")].add(record["event_id"])
        if record.get("event_type") == FINISHED:
            deliveries[record["event_id"]] += 1

    def run_ids(run):
        return {p["run_id"] for p in published[run.nonce]} | ({run.run_id} if run.run_id else set())

    def finished_ids(run):
        return set().union(*(usage[r][FINISHED] for r in run_ids(run)))

    def unrecorded(run):
        """Run requests of this logical run that no finished or failed usage record accounts for."""
        return [p for p in published[run.nonce] if not usage[p["run_id"]][FINISHED] | usage[p["run_id"]][FAILED]]

    foreground = [r for r in runs if r.kind == "foreground"]
    detached = [r for r in runs if r.kind == "detached"]
    answered = [r for r in runs if r.outcome == "result"]
    checks = {
        "crossed results (another owner, run id or output)":
            [r for r in answered if not (r.own and r.run_id in {p["run_id"] for p in published[r.nonce]})],
        "foreground runs without a final answer": [r for r in foreground if r.outcome is None],
        "detached runs never finished": [r for r in detached if r.outcome is None],
        "logical runs whose run request was published twice or more": [r for r in runs if len(published[r.nonce]) > 1],
        "logical runs executed twice or more": [r for r in runs if len(executed[r.nonce]) > 1],
        "answered runs: container_run_finished missing": [r for r in answered if not finished_ids(r)],
        "answered runs: container_run_finished doubled (distinct event_id)":
            [r for r in answered if len(finished_ids(r)) > 1],
        "executed runs without a finished or failed usage record": [r for r in runs if unrecorded(r)],
    }
    per_run = collections.Counter(len(published[r.nonce]) for r in runs)
    rows = [
        ("logical runs: foreground / detached", f"{len(foreground)} / {len(detached)}", "", True),
        ("foreground answered 200 with their own result",
         sum(1 for r in foreground if r.outcome == "result" and r.own), "", True),
        ("detached collected at submission (wait=2) / by polling / by Prefer: wait",
         " / ".join(str(sum(1 for r in detached if r.outcome and r.collected_by == how))
                    for how in ("submission", "poll", "wait")), "", True),
        ("final error answers (foreground error, detached item with error)",
         sum(1 for r in runs if r.outcome == "error"), "", True),
        ("logical runs by run requests published (published: runs)",
         ", ".join(f"{n}: {c}" for n, c in sorted(per_run.items())), "", True),
    ]
    rows += [(name, len(bad), 0, not bad) for name, bad in checks.items()]
    rows += [
        ("finished records delivered more than once (same event_id)",
         sum(1 for n in deliveries.values() if n > 1), "", True),
        ("answers the contract does not allow", len(answers.strays), 0, not answers.strays),
        ("client timeouts (no answer within the client's bound)", answers.timeouts, "", True),
        ("faults not carried out", len(chaos.failed), 0, not chaos.failed),
        ("runs the soak client itself failed on (traceback above)", len(harness_errors), 0, not harness_errors),
    ]
    evidence = {name: [dict(dataclasses.asdict(r), published=published[r.nonce], executed=len(executed[r.nonce]),
                            usage={rid: {t: sorted(ids) for t, ids in usage[rid].items()} for rid in run_ids(r)})
                       for r in bad] for name, bad in checks.items() if bad}
    if answers.strays:
        evidence["answers the contract does not allow"] = [
            dict(zip(("seconds", "kind", "provider", "status", "why", "nonce", "body"), s)) for s in answers.strays]
    if chaos.failed:
        evidence["faults not carried out"] = chaos.failed
    return rows, evidence


def log_lines(path, text):
    """How many lines of a provider's log name `text`: shows that a fault exercised what it was meant to."""
    with open(path, errors="replace") as log:
        return sum(text in line for line in log)


def write_logs(log_dir, runs, evidence):
    with open(log_dir / "soak-runs.jsonl", "w") as out:
        for run in runs:
            out.write(json.dumps(dataclasses.asdict(run)) + "\n")
    with open(log_dir / "soak-evidence.txt", "w") as out:
        for name, items in evidence.items():
            out.write(f"== {name}: {len(items)}\n")
            for item in items:
                out.write(json.dumps(item) + "\n")


def print_table(rows, chaos, answers, elapsed, log_dir, seconds, appendonly):
    print(f"\nsoak: {seconds:.0f} s of chaos, {elapsed:.0f} s in all; {FOREGROUND_CLIENTS} foreground and "
          f"{DETACHED_CLIENTS} detached clients; 2 providers x 2 workers, one redis-server "
          f"({'appendonly, appendfsync always' if appendonly else 'WITHOUT persistence'}), the in-repo Events API")
    for line in chaos.log:
        print(f"  {line}")
    faults = ", ".join(f"{name}: {count}" for name, count in chaos.done.items())
    statuses = [(f"answers to {kind}", ", ".join(f"{k}: {v}" for k, v in sorted(counts.items(), key=str)), "", True)
                for kind, counts in sorted(answers.by_kind.items())]
    table = rows + statuses + [("faults carried out", faults, "", True)]
    width = max(len(name) for name, *_ in table)
    print(f"\n| {'count':<{width}} | value | target | met |\n|{'-' * (width + 2)}|---|---|---|")
    for name, value, target, met in table:
        print(f"| {name:<{width}} | {value} | {target} | {'' if target == '' else 'yes' if met else 'NO'} |")
    missed = [name for name, _, target, met in rows if target != "" and not met]
    print(f"\nlogs and evidence: {log_dir}")
    print("soak: every target met" if not missed else "soak: MISSED: " + "; ".join(missed))


if __name__ == "__main__":
    sys.exit(main())
