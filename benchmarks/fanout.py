"""Fan-out: every provider process reads every reply on the shared broadcast streams.

1. Provider CPU per run with 1, 2 and 4 provider processes (1 worker each)
   sharing one Events API, while runs go through the first one only: what
   each extra process costs is what it spends reading and dropping replies
   meant for another.
2. The drop path in-process, per reply line: a full parse (json.loads of
   the whole line, then a registry miss) against what the stream reader does
   now, ReplyRegistry.unwanted (only the correlation id is read from the raw
   bytes; the line is parsed only when it may be someone's here).
"""
import json
import time
import uuid

from .common import EVENTS_TOKEN, WORKER_TOKEN, console_script, cpu_seconds, free_port, median, provider_env, tree
from .events import fast_events
from .roundtrip import ProviderCaller, timed

RUNS = 1500
IN_FLIGHT = 16

def processes(events_url: str, count: int) -> float:
    """Provider CPU (all processes) per run, in ms, with `count` processes and runs through the first."""
    env = provider_env(BUS_API_TOKEN=EVENTS_TOKEN, BUS_EVENTS_LISTENER_RETRY="1", BUS_EVENTS_LISTENER_REQUIRED="1")
    from contextlib import ExitStack

    with ExitStack() as stack:
        providers = [stack.enter_context(console_script(
            "--backend", "events", "--events-url", events_url, "--workers", "1", "--threads", "32",
            "--max-runs-per-account", "0", env=env)) for _ in range(count)]
        caller = ProviderCaller(providers[0].url)
        timed(caller, IN_FLIGHT, 100)  # warm
        pids = [pid for p in providers for pid in tree(p.pid)]
        before = cpu_seconds(pids)
        timed(caller, IN_FLIGHT, RUNS)
        return (cpu_seconds(pids) - before) / RUNS * 1000


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


def run(table, counts=(1, 2, 4), rounds: int = 3) -> dict:
    per_count = {n: [] for n in counts}
    with fast_events(free_port(), [WORKER_TOKEN, EVENTS_TOKEN]) as url:
        for _ in range(rounds):  # interleaved: 1, 2, 4, 1, 2, 4, ...
            for n in counts:
                per_count[n].append(processes(url, n))
    cpu = {n: median(v) for n, v in per_count.items()}
    for n in counts:
        table.add(f"fan-out: provider CPU per run, {n} provider process{'es' if n > 1 else ''}",
                  f"{cpu[n]:.2f} ms (median of {rounds})")
    growth = (cpu[counts[-1]] - cpu[counts[0]]) / (counts[-1] - counts[0])
    table.add("fan-out: growth per extra process", f"{growth:+.3f} ms per run", "< 0.1 ms", growth < 0.1)
    parsed, checked, size = drop_path()
    table.add(f"fan-out: dropping another process's reply ({size} B line), in-process",
              f"{checked:.1f} µs reading only the correlation id (a full parse: {parsed:.1f} µs)")
    return {"cpu": cpu, "growth": growth, "drop": (parsed, checked)}


if __name__ == "__main__":
    from .common import Table

    table = Table()
    run(table)
    print(table.render())
