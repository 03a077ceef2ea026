"""Capacity: thousands of runs held at once through the events backend.

1. The Events side alone: the benchmark Events API and worker (events.py)
   turning N held runs around for a caller that publishes straight to it,
   and the same for the in-repo test server and responder, for comparison.
2. The provider (2 workers, threads sized for an uneven split) in front of the
   same Events API, loaded by N asyncio callers at once. Figures: wall time
   against the Events side alone, errors, crossed replies (each caller checks
   that its result echoes its own command), peak memory of all provider
   processes per in-flight run, and how the callers' connections split over
   the workers.
"""
import math
import os
import threading
import time
from pathlib import Path

from bus_containers_provider.config import Settings

from .client import direct_runs, post_runs
from .common import EVENTS_TOKEN, WORKER_TOKEN, console_script, free_port, provider_env, rss_kib, token, tree
from .events import fast_events

HOLD = "sleep:5"
TIMEOUT = 90.0


# The busier of 2 workers took 55-61 % of the callers (one listening socket shared by both;
# the worker whose main loop is freer accepts more): threads are sized for two thirds.
BUSIER_SHARE = 2 / 3


def threads_for(in_flight: int) -> int:
    """Threads per worker (of 2) so the busier one's share of `in_flight` fits its run capacity (7/8 of them)."""
    return math.ceil((in_flight * BUSIER_SHARE + 8) * 8 / 7)


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


def through_provider(events_url: str, in_flight: int) -> dict:
    env = provider_events_env()
    threads = threads_for(in_flight)
    base = base_rss(events_url)
    with console_script(*provider_args(events_url, threads), env=env) as provider:
        caller = token("bench-account", "container:run")
        post_runs(provider.url, caller, 20, profile="instant")  # warm each worker's sessions
        time.sleep(0.5)
        sampler = Sampler(provider.pid, int(provider.url.rsplit(':', 1)[1]))
        sampler.start()
        result = post_runs(provider.url, caller, in_flight, profile=HOLD, timeout=TIMEOUT)
        sampler.done.set()
        sampler.join(2)
        # Workers inherit the master's limits; a worker may have been replaced meanwhile.
        stack = stack_kib(provider.pid)
        replaced = sorted(set(sampler.workers) - set(tree(provider.pid)[1:]))
    result.update(threads=threads, capacity=Settings(jwt_secret="x", threads=threads).run_capacity,
                  stack_kib=stack, base_rss=base,
                  # Request threads start at boot, so the idle figure holds their stacks: count from a 32-thread one.
                  rss_per_run=(sampler.peak_rss - base) / max(result["ok"], 1), idle_rss=sampler.idle_rss,
                  peak_rss=sampler.peak_rss, split=sampler.split(), replaced=replaced)
    return result


def in_repo_alone(in_flight: int) -> float:
    from .inrepo import in_repo_events

    with in_repo_events(free_port()) as url:
        return direct_runs(url, EVENTS_TOKEN, in_flight, profile=HOLD, timeout=TIMEOUT)


def run(table, counts=(1000, 5000), in_repo: bool = True) -> dict:
    figures = {}
    if in_repo:  # a thousand only: the thread-per-connection test server is not built for more
        what = "Events side alone, in-repo test server + responder, 1000 runs held 5 s"
        try:
            table.add(what, f"{in_repo_alone(1000):.2f} s")
        except Exception as exc:  # a comparison figure; its absence does not stop the rest
            table.add(what, f"failed: {type(exc).__name__}")
    with fast_events(free_port(), [WORKER_TOKEN, EVENTS_TOKEN]) as events_url:
        for count in counts:
            alone = direct_runs(events_url, EVENTS_TOKEN, count, profile=HOLD, timeout=TIMEOUT)
            table.add(f"Events side alone, benchmark server (events.py), {count} runs held 5 s", f"{alone:.2f} s")
            result = through_provider(events_url, count)
            errors = count - result["ok"]
            others = {k: v for k, v in result["statuses"].items() if k != 200}
            if errors or result["crossed"]:
                table.error(f"capacity {count}", f"{errors} failed {others}, {result['crossed']} crossed")
            if result["replaced"]:
                # Its figures measured a restart, not the provider holding the runs.
                table.error(f"capacity {count}", f"worker(s) {result['replaced']} exited during the run")
            clean = not errors and not result["crossed"]
            over = result["wall"] - alone
            first = count == counts[0]
            table.add(f"capacity: {count} runs held 5 s through the provider (2 workers × {result['threads']} threads)",
                      f"{result['wall']:.2f} s wall, +{over:.2f} s over the Events side; "
                      f"{errors} errors{' ' + str(others) if others else ''}, {result['crossed']} crossed",
                      "≤ +0.4 s, 0 errors, 0 crossed" if first else "0 errors, 0 crossed",
                      clean and (over <= 0.4 or not first))
            table.add(f"capacity: peak RSS of all provider processes per in-flight run ({count})",
                      f"{result['rss_per_run']:.0f} KiB (peak {result['peak_rss'] / 1024:.0f} MiB − "
                      f"{result['base_rss'] / 1024:.0f} MiB of an idle 32-thread provider; idle with its threads "
                      f"{result['idle_rss'] / 1024:.0f} MiB; stack size {result['stack_kib']} KiB, reserved, not resident)",
                      "≤ 128 KiB", result["rss_per_run"] <= 128)
            split = result["split"]
            table.add(f"capacity: callers held per worker at peak ({count})",
                      " / ".join(str(n) for n in split) + f" ({100 * split[0] / max(sum(split), 1):.0f} % on the "
                      f"busier; run capacity {result['capacity']} per worker)",
                      "busier ≤ run capacity", split[0] <= result["capacity"])
            figures[count] = dict(result, alone=alone)
    return figures


if __name__ == "__main__":
    import sys

    from .common import Table

    table = Table()
    counts = tuple(int(n) for n in sys.argv[1:]) or (1000, 5000)
    run(table, counts, in_repo=1000 in counts)
    print(table.render())
