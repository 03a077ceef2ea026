"""Registry micro-benchmark: register, resolve and discard per second under 32 threads.

Each operation cycle is what one request does to the registry: register a
waiter, have it resolved (as the listener would), discard it. Beside it is
the same cycle in one thread: if the lock were contended, 32 threads would
fall well below it (they share one GIL, so they cannot rise above it).
"""
import threading
import time
import uuid

from bus_containers_provider.bus.replies import ReplyRegistry

from .common import median

NAME = "bus.containers.run.response"
CYCLES = 20000


def cycles(registry: ReplyRegistry, count: int, ids: list) -> None:
    for n in range(count):
        correlation = ids[n]
        waiter = registry.register(NAME, correlation)
        registry.resolve(NAME, {"correlationId": correlation, "payload": {}})
        registry.discard(waiter)


def rate(threads: int, total: int = CYCLES) -> float:
    registry = ReplyRegistry()
    per = total // threads
    ids = [[str(uuid.uuid4()) for _ in range(per)] for _ in range(threads)]
    workers = [threading.Thread(target=cycles, args=(registry, per, ids[t])) for t in range(threads)]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - started
    assert registry.pending() == 0
    return per * threads / elapsed


def run(table) -> dict:
    pairs = [(rate(1), rate(32)) for _ in range(5)]  # interleaved rounds
    single, many = median(p[0] for p in pairs), median(p[1] for p in pairs)
    table.add("registry: register+resolve+discard cycles/s, 32 threads",
              f"{many:,.0f}/s ({many / single:.2f} × the 1-thread rate of {single:,.0f}/s)",
              "≥ 0.8 × the 1-thread rate, far above ~1,000 runs/s", many >= 0.8 * single and many > 10_000)
    return {"single": single, "threads": many}


if __name__ == "__main__":
    from .common import Table

    run(Table())
