"""Fan-out: every provider process reads every reply on the shared broadcast streams.

1. What a user sees: P provider processes (1 worker each) on one Events API,
   sequential runs sent round-robin over them, and the whole-process CPU
   (user + system, gunicorn master included) of all of them per run, for
   P = 1, 2 and 4, interleaved over the rounds. The growth per extra process
   is the figure.
2. Why the earlier in-repo figure was smaller, in the same rounds: the
   earlier design sent 16 runs in flight, all through the first process,
   so replies arrived close together and the other processes' stream readers
   woke once for several lines; sequentially through the first process,
   each reply wakes every other process on its own. The first-process-only
   modes also show what the other processes spend on replies that are not
   theirs.
3. Why the user's figure grows even though the other processes now read
   replies cheaply: one process alone, with a pause between its runs as long
   as the runs the other three processes of a round-robin take meanwhile.
   A process that goes idle between runs pays more per run to wake up
   (threads, caches), whatever the streams carry.
4. The drop path in-process, per reply line: a full parse (json.loads of
   the whole line, then a registry miss) against what the stream reader does,
   ReplyRegistry.unwanted (only the correlation id is read from the raw bytes).
"""
import itertools
import json
import os
import time
import uuid
from contextlib import ExitStack

from .common import EVENTS_TOKEN, WORKER_TOKEN, console_script, cpu_seconds, free_port, median, provider_env, tree
from .events import fast_events
from .roundtrip import ProviderCaller, timed

RUNS = int(os.environ.get("BENCH_FANOUT_RUNS", "1000"))
ROUNDS = int(os.environ.get("BENCH_FANOUT_ROUNDS", "3"))
COUNTS = (1, 2, 4)
PAUSE = 0.006
# The earlier in-repo design: this many in flight, all through the first process.
IN_FLIGHT = 16


class Paused:
    """Runs one after another through one process, each followed by a pause."""

    def __init__(self, url: str, pause: float):
        self.caller, self.pause = ProviderCaller(url), pause

    def run(self, n: int) -> float:
        seconds = self.caller.run(n)
        time.sleep(self.pause)
        return seconds


class RoundRobin:
    """Runs one after another, each through the next provider process in turn."""

    def __init__(self, urls):
        self.callers = itertools.cycle([ProviderCaller(url) for url in urls])

    def run(self, n: int) -> float:
        return next(self.callers).run(n)


def providers(stack: ExitStack, events_url: str, count: int) -> list:
    env = provider_env(BUS_API_TOKEN=EVENTS_TOKEN, BUS_EVENTS_LISTENER_RETRY="1", BUS_EVENTS_LISTENER_REQUIRED="1")
    return [stack.enter_context(console_script(
        "--backend", "events", "--events-url", events_url, "--workers", "1", "--threads", "32",
        "--max-runs-per-account", "0", env=env)) for _ in range(count)]


def cpu_per_run(processes, caller, in_flight: int, runs: int) -> tuple:
    """(ms of CPU per run over every process, of it the ms in the processes after the first)."""
    timed(caller, in_flight, 50)  # warm every process's connections and threads
    pids = [tree(p.pid) for p in processes]
    before = [cpu_seconds(p) for p in pids]
    timed(caller, in_flight, runs)
    used = [cpu_seconds(p) - b for p, b in zip(pids, before)]
    return sum(used) / runs * 1000, sum(used[1:]) / runs * 1000


def measure(events_url: str, count: int, runs: int) -> dict:
    """{mode: (CPU per run over every process, of it in the processes after the first)}, in ms."""
    with ExitStack() as stack:
        processes = providers(stack, events_url, count)
        first = ProviderCaller(processes[0].url)
        figures = {"user": cpu_per_run(processes, RoundRobin([p.url for p in processes]), 1, runs),
                   "sequential, first only": cpu_per_run(processes, first, 1, runs),
                   f"{IN_FLIGHT} in flight, first only": cpu_per_run(processes, first, IN_FLIGHT, runs)}
        if count == 1:
            # As long as 3 other processes' runs take: about 2 ms each, sequentially.
            figures["paused"] = cpu_per_run(processes, Paused(processes[0].url, PAUSE), 1, runs)
        return figures


def drop_path(lines: int = 20000) -> tuple:
    """µs per reply line for a full parse and for the registry's raw check, on a typical run reply."""
    from bus_containers_provider.bus.client import _parse
    from bus_containers_provider.bus.replies import ReplyRegistry

    registry = ReplyRegistry()
    for _ in range(32):
        registry.register("bus.containers.run.response", str(uuid.uuid4()))
    result = {"run_id": f"run_{uuid.uuid4().hex}", "owner_account_id": "acct", "runner_name": "worker-1",
              "image": "alpine:latest", "args": ["sh", "-c", "printf OK"], "exit_code": 0, "stdout": "OK" * 100,
              "stderr": "", "duration_ms": 12, "runtime": {"state": "ready", "provider": "docker"}}
    line = json.dumps({"id": "1234", "name": "bus.containers.run.response", "correlationId": str(uuid.uuid4()),
                       "payload": result}).encode()

    def parsed():
        envelope = _parse(line, "bench")
        registry.resolve("bus.containers.run.response", envelope)

    def checked():
        if not registry.unwanted(line):
            parsed()

    figures = []
    for fn in (parsed, checked):
        started = time.perf_counter()
        for _ in range(lines):
            fn()
        figures.append((time.perf_counter() - started) / lines * 1e6)
    return figures[0], figures[1], len(line)


def growth(cpu: dict) -> float:
    """ms of CPU per run added by each process beyond the first (a straight line through 1 and 4)."""
    return (cpu[COUNTS[-1]] - cpu[COUNTS[0]]) / (COUNTS[-1] - COUNTS[0])


def run(table, rounds: int = ROUNDS, runs: int = RUNS) -> dict:
    totals, others = {}, {}
    with fast_events(free_port(), [WORKER_TOKEN, EVENTS_TOKEN]) as url:
        for _ in range(rounds):  # interleaved: 1, 2, 4, 1, 2, 4, ...
            for n in COUNTS:
                for mode, (total, rest) in measure(url, n, runs).items():
                    totals.setdefault(mode, {}).setdefault(n, []).append(total)
                    others.setdefault(mode, {}).setdefault(n, []).append(rest)
    cpu = {mode: {n: median(v) for n, v in by.items()} for mode, by in totals.items()}
    rest = {mode: {n: median(v) for n, v in by.items()} for mode, by in others.items()}
    paused = cpu.pop("paused")[1]
    growths = {mode: growth(by) for mode, by in cpu.items()}
    table.add("fan-out: provider CPU per run, sequential round-robin over 1 / 2 / 4 processes (whole processes)",
              " / ".join(f"{cpu['user'][n]:.2f}" for n in COUNTS) + f" ms (median of {rounds}, {runs} runs each)")
    table.add("fan-out: growth per extra process, as a user sees it", f"{growths['user']:+.3f} ms per run",
              "< 0.1 ms", growths["user"] < 0.1)
    for mode in list(cpu)[1:]:
        table.add(f"fan-out: {mode} (the earlier design is 16 in flight), 1 / 2 / 4 processes",
                  " / ".join(f"{cpu[mode][n]:.2f}" for n in COUNTS) + f" ms, growth {growths[mode]:+.3f} ms per "
                  f"process; the 3 others with 4 read each reply for {rest[mode][4] / 3:.3f} ms of CPU each")
    table.add(f"fan-out: one process alone, sequential, pausing {PAUSE * 1000:.0f} ms after each run",
              f"{paused:.2f} ms against {cpu['user'][1]:.2f} ms without pauses: {paused - cpu['user'][1]:+.2f} ms "
              "per run for waking from idle, which round-robin over 4 processes pays too")
    parsed, checked, size = drop_path()
    table.add(f"fan-out: dropping another process's reply ({size} B line), in-process",
              f"{checked:.1f} µs reading only the correlation id (a full parse: {parsed:.1f} µs)")
    return {"cpu": cpu, "others": rest, "growth": growths, "paused": paused, "drop": (parsed, checked)}


if __name__ == "__main__":
    from .common import Table

    table = Table()
    run(table)
    print(table.render())
