"""Detached runs (CONTRACT §9): ten thousand in flight on one host, and what polling them costs.

1. In flight. The provider (2 workers × 32 threads, events backend, Redis
   state on a redis-server of its own, no usage records, no per-account
   limit) takes 10,000 runs with `Prefer: respond-async`, spread over 100
   accounts, from 32 kept-alive connections. The benchmark worker (events.py)
   holds every reply at its gate until 10 s after the last run was accepted,
   then publishes them all at once: every run is in flight together, and the
   replies come as one burst, the hardest case for completing records.
   Figures: the answers (each must be a 202); every record read back through
   GET /runs of its account, finished, with its own result (the worker's
   stdout echoes the run's owner and nonce); the time from the last reply
   published (seen on the reply stream) to the last record finished (a
   finished record is kept for --run-retention, so its TTL in Redis tells
   when it finished); the growth of the workers' RSS and of Redis's
   used_memory per record.
2. Polling. GET /runs/{run_id} of a running and of a finished record on that
   provider, beside the static POST /runs and bare Flask of overhead.py, in
   interleaved wrk rounds: requests per second and server CPU per request.

`python -m benchmarks.detached [RUNS]` runs it alone (BENCH_DETACHED_RUNS
sets RUNS for `make bench`).
"""
import asyncio
import os
import signal
import threading
import time

import redis
import requests

from .capacity import provider_events_env
from .client import RUNS, over_connections
from .common import (EVENTS_TOKEN, ROUNDS, WORKER_TOKEN, console_script, cpu_seconds, free_port, median, percentile,
                     rss_kib, token, tree, wrk)
from .events import RUN_REPLY, events_process, open_stream, read_events
from .overhead import bare_server, measure, static_provider

from redisserver import RedisServer  # noqa: E402 (tests/, put on the path by .common)

RUNS_IN_FLIGHT = int(os.environ.get("BENCH_DETACHED_RUNS", "10000"))
ACCOUNTS = 100  # an account's run list shows its 100 newest records: with 100 runs each, all are read back
CONNECTIONS = 32
HOLD = 10.0  # every reply is held until this long after the last run was accepted
RETENTION = 3600  # --run-retention (s): a finished record's TTL starts from it
GATE = "gate:900"  # held at the worker's gate, at most 15 minutes: longer than the benchmark
TIMEOUT_SECONDS = 900  # each run's own, so no reply deadline passes during the benchmark
WAIT = 120.0  # the longest wait for the replies, and again for the records
RUN_KEY = "bus:containers:run:"  # a run record's key in the store (state/redis.py)
FINISHED_HEAD = '{"state":"finished"'
SCOPES = "container:run container:read"
RSS_TARGET_KIB = 8


def provider_args(events_url: str, state_url: str) -> tuple:
    return ("--backend", "events", "--events-url", events_url, "--workers", "2", "--threads", "32",
            "--usage-backend", "none", "--state-url", state_url, "--max-runs-per-account", "0",
            "--run-retention", f"{RETENTION}s")


def ready(url: str, timeout: float = 20.0) -> None:
    """Until /readyz answers 200: every reply stream open, the store reachable."""
    deadline = time.monotonic() + timeout
    while requests.get(f"{url}/readyz", timeout=5).status_code != 200:
        if time.monotonic() > deadline:
            raise SystemExit(f"the provider at {url} was not ready within {timeout:g} s")
        time.sleep(0.2)


async def submit(url: str, runs: list, profile: str) -> list:
    """POST each (account, nonce) with Prefer: respond-async: (what came back, run id) per run.

    What came back is 202 only for a 202 with the run's Location and a running item.
    """
    bearers = {account: token(account, SCOPES) for account in {account for account, _ in runs}}

    async def one(connection, run):
        account, nonce = run
        body = {"profile": profile, "command": [nonce], "timeout_seconds": TIMEOUT_SECONDS}
        try:
            status, headers, item = await connection.request("POST", RUNS, bearers[account], body,
                                                             {"Prefer": "respond-async"})
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
            return type(exc).__name__, None
        if status == 202 and (headers.get("location") != f"{RUNS}/{item.get('id')}" or item.get("state") != "running"):
            return "202 without its Location or running item", item.get("id")
        return status, item.get("id")

    return await over_connections(url, runs, CONNECTIONS, one)


async def read_back(url: str, accounts: list) -> list:
    """(status, body) of GET /runs for each account."""
    bearers = {account: token(account, SCOPES) for account in accounts}

    async def one(connection, account):
        status, _, body = await connection.request("GET", RUNS, bearers[account])
        return status, body

    return await over_connections(url, accounts, 8, one)


class ReplyWatch(threading.Thread):
    """When each run's reply was published, as a reader of the broadcast reply stream (like the provider) sees it."""

    def __init__(self, events_url: str):
        super().__init__(daemon=True)
        self.port = int(events_url.rsplit(":", 1)[1])
        self.seen = {}  # run_id -> time.time() of its reply
        self.connected = threading.Event()

    def run(self):
        async def follow():
            reader = await open_stream(self.port, EVENTS_TOKEN, RUN_REPLY)
            self.connected.set()
            async for envelope in read_events(reader):
                self.seen[envelope["payload"]["run_id"]] = time.time()

        try:
            asyncio.run(follow())
        except (OSError, ValueError, asyncio.IncompleteReadError):
            pass  # the Events API went away: the benchmark is over


def store_bytes(store) -> int:
    """Redis's used_memory less its clients' buffers (the provider's pooled connections come and go)."""
    memory = store.info("memory")
    return memory["used_memory"] - memory["mem_clients_normal"]


def states(store, run_ids: list) -> list:
    """Whether each record is finished (read from the head of its JSON, not the whole record)."""
    pipe = store.pipeline(transaction=False)
    for run_id in run_ids:
        pipe.getrange(RUN_KEY + run_id, 0, len(FINISHED_HEAD) - 1)
    return [head == FINISHED_HEAD for head in pipe.execute()]


def wait_finished(store, run_ids: list, timeout: float) -> list:
    """The records not finished once all are or `timeout` passes (read once a second: the store is shared)."""
    left, deadline = list(run_ids), time.monotonic() + timeout
    while left and time.monotonic() < deadline:
        time.sleep(1.0)
        left = [run_id for run_id, done in zip(left, states(store, left)) if not done]
    return left


def finished_at(store, run_ids: list) -> tuple:
    """{run_id: when it finished} from the TTLs of finished records, and the resolution of that reading (s).

    A finished record is set to expire RETENTION after it finished; each TTL is
    read against the server's clock, taken after the last of them.
    """
    pipe = store.pipeline(transaction=False)
    pipe.time()
    for run_id in run_ids:
        pipe.pttl(RUN_KEY + run_id)
    pipe.time()
    first, *ttls, last = pipe.execute()
    now = last[0] + last[1] / 1e6
    when = {run_id: now - (RETENTION * 1000 - ttl) / 1000 for run_id, ttl in zip(run_ids, ttls) if ttl > 0}
    return when, now - (first[0] + first[1] / 1e6)


def check(listed: list, accounts: list, runs: dict) -> dict:
    """Runs read back finished with their own result; lost (not read back finished) and crossed ones."""
    own, wrong, foreign, unread = set(), set(), 0, 0
    for account, (status, body) in zip(accounts, listed):
        if status != 200:
            unread += 1
            continue
        for shown in body["items"]:
            mine = runs.get(shown["id"])
            if mine is None or mine[0] != account:
                foreign += 1  # another account's run, or none of ours
            elif shown["state"] == "finished":
                result = shown.get("result") or {}
                fields = (result.get("stdout"), result.get("run_id"), result.get("owner_account_id"))
                (own if fields == (f"{account} {mine[1]}", shown["id"], account) else wrong).add(shown["id"])
    return {"own": len(own), "crossed": len(wrong) + foreign, "lost": len(runs) - len(own) - len(wrong),
            "lists_failed": unread}


def in_flight(events, provider, store, count: int) -> dict:
    """Submit `count` gated runs, hold them, open the gate, wait for every record: the raw measurements."""
    accounts = [f"detached-{n:03d}" for n in range(ACCOUNTS)]
    nonces = [(accounts[n % ACCOUNTS], f"nonce-{n:05d}-{os.urandom(4).hex()}") for n in range(count)]
    pids = tree(provider.pid)
    workers = pids[1:]
    # Warm each worker's threads, sessions and scripts; these records finish at once.
    asyncio.run(submit(provider.url, [("detached-warm", f"warm-{n}") for n in range(200)], "instant"))
    time.sleep(2.0)
    watch = ReplyWatch(events.url)
    watch.start()
    if not watch.connected.wait(10):
        raise SystemExit("could not read the reply stream")
    m = {"count": count, "rss": [rss_kib(workers)], "memory": [store_bytes(store)],
         "cpu": [cpu_seconds(pids)], "started": time.monotonic()}

    answers = asyncio.run(submit(provider.url, nonces, GATE))
    m["submitted"] = time.monotonic()
    m["cpu"].append(cpu_seconds(pids))
    runs = {run_id: nonce for (status, run_id), nonce in zip(answers, nonces) if status == 202}
    m["statuses"] = {}
    for status, _ in answers:
        m["statuses"][status] = m["statuses"].get(status, 0) + 1
    time.sleep(1.0)  # the last publishes settle
    m["rss"].append(rss_kib(workers))
    m["memory"].append(store_bytes(store))
    m["record_bytes"] = [store.memory_usage(RUN_KEY + next(iter(runs)))] if runs else [0]
    m["early"] = len(watch.seen)  # replies before the gate opened: must be none
    m["running"] = sum(not done for done in states(store, list(runs)))

    time.sleep(max(0.0, m["submitted"] + HOLD - time.monotonic()))
    m["cpu"].append(cpu_seconds(pids))
    events.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + WAIT
    while len(watch.seen) < len(runs) + m["early"] and time.monotonic() < deadline:
        time.sleep(0.2)
    m["left"] = wait_finished(store, list(runs), WAIT)
    m["cpu"].append(cpu_seconds(pids))
    m["memory"].append(store_bytes(store))
    m["rss"].append(rss_kib(workers))
    m["record_bytes"].append(store.memory_usage(RUN_KEY + next(iter(runs))) if runs else 0)
    m["finished"], m["resolution"] = finished_at(store, [run_id for run_id in runs if run_id not in m["left"]])
    m["replied"] = {run_id: watch.seen[run_id] for run_id in runs if run_id in watch.seen}
    m["verdict"] = check(asyncio.run(read_back(provider.url, accounts)), accounts, runs)
    m["replaced"] = sorted(set(workers) - set(tree(provider.pid)[1:]))
    m["accepted"] = len(runs)
    return m


def report(table, m: dict) -> dict:
    accepted, verdict, statuses = max(m["accepted"], 1), m["verdict"], m["statuses"]
    others = {k: v for k, v in statuses.items() if k != 202}
    if others or m["early"] or m["replaced"] or verdict["lost"] or verdict["crossed"] or m["left"]:
        table.error("detached", f"answers {others}, {m['early']} early replies, {len(m['left'])} unfinished, "
                                f"{verdict}, workers replaced {m['replaced']}")
    seconds = m["submitted"] - m["started"]
    table.add(f"detached: {m['count']} runs submitted with Prefer: respond-async (2 workers × 32 threads, Redis)",
              f"{statuses.get(202, 0)} × 202{' ' + str(others) if others else ''} in {seconds:.1f} s "
              f"({m['accepted'] / seconds:.0f}/s; provider CPU {1000 * (m['cpu'][1] - m['cpu'][0]) / accepted:.2f} ms "
              f"per run); {m['running']} records running, {m['early']} replies before the gate opened",
              "all 202", not others and m["running"] == m["accepted"] == m["count"] and not m["early"])
    table.add("detached: records read back (GET /runs per account), finished with their own result",
              f"{verdict['own']} of {m['accepted']}; {verdict['lost']} lost, {verdict['crossed']} crossed, "
              f"{verdict['lists_failed']} lists failed", "all; 0 lost, 0 crossed",
              verdict["own"] == m["accepted"] == m["count"] and not verdict["crossed"])
    finished, replied = m["finished"], m["replied"]
    lags = [finished[run_id] - replied[run_id] for run_id in finished if run_id in replied]
    last = max(finished.values()) - max(replied.values()) if lags else None
    if lags:
        table.add(f"detached: last reply published → last record finished ({len(replied)} replies at once)",
                  f"{last:+.2f} s (replies published over {max(replied.values()) - min(replied.values()):.2f} s; "
                  f"reply → finished per record p50 {percentile(lags, 0.5):.2f}, p99 {percentile(lags, 0.99):.2f} s; "
                  f"provider CPU {1000 * (m['cpu'][3] - m['cpu'][2]) / accepted:.2f} ms per completion; "
                  f"finish times ±{m['resolution'] * 1000:.0f} ms)")
    before, held, after = m["rss"]
    per_run = (held - before) / accepted
    table.add(f"detached: worker RSS growth per in-flight run ({m['accepted']} in flight)",
              f"{per_run:.1f} KiB ({before / 1024:.0f} → {held / 1024:.0f} MiB, 2 workers; "
              f"{after / 1024:.0f} MiB once all finished)", f"≤ {RSS_TARGET_KIB} KiB", per_run <= RSS_TARGET_KIB)
    memory = m["memory"]
    table.add("detached: Redis used_memory per record (less client buffers)",
              f"{(memory[1] - memory[0]) / accepted:.0f} B running, {(memory[2] - memory[0]) / accepted:.0f} B finished "
              f"(MEMORY USAGE of one record's key: {m['record_bytes'][0]} B running, {m['record_bytes'][1]} B finished)")
    return {"statuses": statuses, "verdict": verdict, "rss_per_run": per_run, "last_lag": last,
            "lag_p50": percentile(lags, 0.5) if lags else None}


def polling(table, provider, rounds: int) -> dict:
    """GET /runs/{run_id} of a running and a finished record, beside static POST /runs and bare Flask."""
    account = "detached-poll"
    (held, running_id), = asyncio.run(submit(provider.url, [(account, "poll-running")], GATE))
    (done, finished_id), = asyncio.run(submit(provider.url, [(account, "poll-finished")], "instant"))
    bearer = token(account, "container:read")
    deadline = time.monotonic() + 10
    while requests.get(f"{provider.url}{RUNS}/{finished_id}", headers={"Authorization": f"Bearer {bearer}"},
                       timeout=5).json().get("state") != "finished":
        if time.monotonic() > deadline:
            raise SystemExit(f"run {finished_id} did not finish")
        time.sleep(0.1)
    if (held, done) != (202, 202):
        raise SystemExit(f"the polled runs were answered {held} and {done}")
    with static_provider() as static, bare_server() as bare:
        sides = {
            "GET /runs/{run_id}, running record": (provider, dict(path=f"{RUNS}/{running_id}", script="get_run.lua",
                                                                  bearer=bearer)),
            "GET /runs/{run_id}, finished record": (provider, dict(path=f"{RUNS}/{finished_id}",
                                                                   script="get_run.lua", bearer=bearer)),
            "POST /runs, static backend": (static, {}),
            "POST, bare Flask": (bare, {}),
        }
        for server, request in sides.values():
            wrk(server.url, 2, **request)  # warm
        figures = {name: [] for name in sides}
        for n in range(rounds):  # interleaved: every side once per round
            for name, (server, request) in sides.items():
                figures[name].append(measure(server, **request))
            print(f"    round {n + 1}: " + "   ".join(f"{name}: {rows[-1][0]:.0f} req/s {rows[-1][1]:.0f} µs"
                                                   for name, rows in figures.items()), flush=True)
    bare_cpu = median(cpu for _, cpu in figures["POST, bare Flask"])
    for name, rows in figures.items():
        cpu = median(c for _, c in rows)
        table.add(f"polling: {name}", f"{median(r for r, _ in rows):.0f} req/s, {cpu:.0f} µs server CPU/request "
                                      f"({cpu / bare_cpu:.2f} × bare Flask; median of {rounds}, 2 workers × 32 "
                                      f"threads, wrk -t2 -c32)")
    return {name: (median(r for r, _ in rows), median(c for _, c in rows)) for name, rows in figures.items()}


def run(table, count: int = RUNS_IN_FLIGHT, rounds: int = ROUNDS) -> dict:
    with RedisServer() as state, events_process(free_port(), [WORKER_TOKEN, EVENTS_TOKEN]) as events, \
            console_script(*provider_args(events.url, state.url), env=provider_events_env()) as provider:
        ready(provider.url)
        store = redis.Redis.from_url(state.url, decode_responses=True)
        figures = report(table, in_flight(events, provider, store, count))
        figures["polling"] = polling(table, provider, rounds)
    return figures


if __name__ == "__main__":
    import sys

    from .common import Table

    table = Table()
    run(table, int(sys.argv[1]) if len(sys.argv) > 1 else RUNS_IN_FLIGHT)
    print(table.render())
