"""Capacity: thousands of runs held at once through the events backend, spread evenly over the workers.

1. The Events side alone: the benchmark Events API and worker (events.py)
   turning N held runs around for a caller that publishes straight to it,
   and the same for the in-repo test server and responder, for comparison.
2. Even workers and intake, in paired rounds: the provider (2 workers, each
   with a run capacity just over half of N) in front of the same Events API,
   loaded by N asyncio callers at once, each round right after a round of
   the Events side alone. Per round: answers refused (a worker's run
   capacity taken), how the callers split over the workers, the provider's
   CPU per run (all its processes) and its wall time over the Events side.
   Also crossed replies (each caller checks its result echoes its own
   command) and peak memory per in-flight run.
3. 5,000 runs once, threads sized the same way.
"""
import itertools
import math
import os
import threading
import time
from pathlib import Path

from bus_containers_provider.config import Settings

from .client import direct_runs, post_runs
from .common import (
    EVENTS_TOKEN, WORKER_TOKEN, console_script, cpu_seconds, free_port, median, provider_env, rss_kib, token, tree,
)
from .events import fast_events

HOLD = "sleep:5"
TIMEOUT = 90.0
ROUNDS = int(os.environ.get("BENCH_CAPACITY_ROUNDS", "10"))
# Run capacity per worker beyond an even share of the burst: the workers spread it (board.py).
MARGIN = 17


def threads_for(in_flight: int, workers: int = 2) -> int:
    """The fewest threads per worker whose run capacity holds an even share of `in_flight`, plus MARGIN."""
    share = math.ceil(in_flight / workers) + MARGIN
    return next(t for t in itertools.count(share) if Settings(jwt_secret="x", threads=t).run_capacity >= share)


def callers(pid: int, port: int) -> int:
    """Established connections to the provider's port held by process `pid`."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "01":  # local port, ESTABLISHED
            inodes.add(fields[9])
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        count += link.startswith("socket:[") and link[8:-1] in inodes
    return count


def stack_kib(pid: int) -> str:
    """A thread's stack reservation in a worker: the soft RLIMIT_STACK (no threading.stack_size is set)."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max stack size"):
            soft = line.split()[3]
            return soft if soft == "unlimited" else str(int(soft) // 1024)
    return "?"


class Sampler(threading.Thread):
    """Peak RSS of the provider's processes, and the most callers each worker held, every 0.2 s."""

    def __init__(self, master: int, port: int):
        super().__init__(daemon=True)
        self.port = port
        self.pids = tree(master)
        self.workers = self.pids[1:]
        self.idle_rss = rss_kib(self.pids)
        self.peak_rss = self.idle_rss
        self.peak_callers = {pid: 0 for pid in self.workers}
        self.done = threading.Event()

    def run(self):
        while not self.done.wait(0.2):
            self.peak_rss = max(self.peak_rss, rss_kib(self.pids))
            for pid in self.workers:
                try:
                    self.peak_callers[pid] = max(self.peak_callers[pid], callers(pid, self.port))
                except OSError:
                    pass

    def split(self) -> list:
        return sorted(self.peak_callers.values(), reverse=True)


def provider_args(events_url: str, threads: int) -> tuple:
    return ("--backend", "events", "--events-url", events_url, "--workers", "2", "--threads", str(threads),
            "--max-runs-per-account", "0")


def provider_events_env() -> dict:
    return provider_env(BUS_API_TOKEN=EVENTS_TOKEN, BUS_EVENTS_LISTENER_RETRY="1", BUS_EVENTS_LISTENER_REQUIRED="1")


def base_rss(events_url: str) -> int:
    """RSS of all processes of an idle provider with the default 32 threads: what no in-flight run costs."""
    with console_script(*provider_args(events_url, 32), env=provider_events_env()) as provider:
        post_runs(provider.url, token("bench-account", "container:run"), 20, profile="instant")
        time.sleep(0.5)
        return rss_kib(tree(provider.pid))


def held_burst(provider, caller: str, in_flight: int) -> dict:
    """One burst of `in_flight` held runs: answers, split, CPU per run and peak memory."""
    sampler = Sampler(provider.pid, int(provider.url.rsplit(':', 1)[1]))
    sampler.start()
    before = cpu_seconds(sampler.pids)
    result = post_runs(provider.url, caller, in_flight, profile=HOLD, timeout=TIMEOUT)
    used = cpu_seconds(sampler.pids) - before
    sampler.done.set()
    sampler.join(2)
    refused = result["statuses"].get(503, 0)
    return dict(result, cpu_ms=used / in_flight * 1000, split=sampler.split(), refused=refused,
                peak_rss=sampler.peak_rss, idle_rss=sampler.idle_rss, workers=sampler.workers)


def paired_rounds(events_url: str, in_flight: int, rounds: int) -> dict:
    """`rounds` of (the Events side alone, then the same burst through one long-lived provider)."""
    threads = threads_for(in_flight)
    base = base_rss(events_url)
    figures = []
    with console_script(*provider_args(events_url, threads), env=provider_events_env()) as provider:
        caller = token("bench-account", "container:run")
        post_runs(provider.url, caller, 20, profile="instant")  # warm each worker's connections
        for number in range(rounds):
            time.sleep(0.5)
            alone = direct_runs(events_url, EVENTS_TOKEN, in_flight, profile=HOLD, timeout=TIMEOUT)
            burst = held_burst(provider, caller, in_flight)
            burst.update(alone=alone, over=burst["wall"] - alone)
            print(f"    round {number + 1}: {burst['refused']} refused, split {burst['split']}, "
                  f"{burst['cpu_ms']:.2f} ms CPU per run, {burst['over']:+.2f} s over the Events side alone",
                  flush=True)
            figures.append(burst)
        stack = stack_kib(provider.pid)
        replaced = sorted({pid for f in figures for pid in f["workers"]} - set(tree(provider.pid)[1:]))
    return {"rounds": figures, "threads": threads, "stack_kib": stack, "base_rss": base, "replaced": replaced,
            "capacity": Settings(jwt_secret="x", threads=threads).run_capacity}


def in_repo_alone(in_flight: int) -> float:
    from .inrepo import in_repo_events

    with in_repo_events(free_port()) as url:
        return direct_runs(url, EVENTS_TOKEN, in_flight, profile=HOLD, timeout=TIMEOUT)


def report(table, count: int, measured: dict, first: bool) -> None:
    rounds = measured["rounds"]
    what = f"{count} runs held 5 s, 2 workers × {measured['threads']} threads (run capacity {measured['capacity']} each)"
    for burst in rounds:
        errors = count - burst["ok"]
        if errors or burst["crossed"]:
            others = {k: v for k, v in burst["statuses"].items() if k != 200}
            table.error(f"capacity {count}", f"{errors} failed {others}, {burst['crossed']} crossed")
    if measured["replaced"]:
        # Its figures measured a restart, not the provider holding the runs.
        table.error(f"capacity {count}", f"worker(s) {measured['replaced']} exited during the run")
    refused = [b["refused"] for b in rounds]
    table.add(f"even workers: refused for capacity, {what}, each of {len(rounds)} rounds",
              ", ".join(str(n) for n in refused), "0 in every round", not any(refused))
    table.add(f"even workers: callers held per worker at peak ({count}), each round",
              ", ".join("/".join(str(n) for n in b["split"]) for b in rounds))
    cpu = [b["cpu_ms"] for b in rounds]
    over = [b["over"] for b in rounds]
    errors = sum(count - b["ok"] for b in rounds)
    crossed = sum(b["crossed"] for b in rounds)
    span = f"(median of {len(rounds)}; {min(cpu):.2f}-{max(cpu):.2f})" if len(rounds) > 1 else ""
    table.add(f"intake: provider CPU per events run, {count} in flight (all provider processes)",
              f"{median(cpu):.2f} ms {span}", "≤ 1.0 ms" if first else "", median(cpu) <= 1.0 if first else None)
    alone = median([b["alone"] for b in rounds])
    table.add(f"intake: provider wall over the Events side alone ({alone:.2f} s), {what}",
              f"{median(over):+.2f} s (median of {len(rounds)} paired rounds; {min(over):+.2f} to {max(over):+.2f}); "
              f"{errors} errors, {crossed} crossed", "≤ +0.4 s, 0 errors, 0 crossed" if first else "0 errors, 0 crossed",
              (median(over) <= 0.4 or not first) and not errors and not crossed)
    peak = max(b["peak_rss"] for b in rounds)
    per_run = (peak - measured["base_rss"]) / count
    table.add(f"capacity: peak RSS of all provider processes per in-flight run ({count})",
              f"{per_run:.0f} KiB (peak {peak / 1024:.0f} MiB − {measured['base_rss'] / 1024:.0f} MiB of an idle "
              f"32-thread provider; idle with its threads {rounds[0]['idle_rss'] / 1024:.0f} MiB; stack size "
              f"{measured['stack_kib']} KiB, reserved, not resident)", "≤ 128 KiB", per_run <= 128)


def run(table, counts=(1000, 5000), in_repo: bool = True, rounds: int = ROUNDS) -> dict:
    figures = {}
    if in_repo:  # a thousand only: the thread-per-connection test server is not built for more
        what = "Events side alone, in-repo test server + responder, 1000 runs held 5 s"
        try:
            table.add(what, f"{in_repo_alone(1000):.2f} s")
        except Exception as exc:  # a comparison figure; its absence does not stop the rest
            table.add(what, f"failed: {type(exc).__name__}")
    with fast_events(free_port(), [WORKER_TOKEN, EVENTS_TOKEN]) as events_url:
        for count in counts:
            first = count == counts[0]
            print(f"  {count} runs held 5 s:", flush=True)
            figures[count] = paired_rounds(events_url, count, rounds if first else 1)
            report(table, count, figures[count], first)
    return figures


if __name__ == "__main__":
    import sys

    from .common import Table

    table = Table()
    counts = tuple(int(n) for n in sys.argv[1:]) or (1000, 5000)
    run(table, counts, in_repo=1000 in counts)
    print(table.render())
