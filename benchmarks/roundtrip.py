"""Events round trip: what the provider adds to a run, beyond the Events API's own publish→reply.

Against one Events API and an instant worker, two kinds of round trip are
timed in alternating batches: a bare one (publish the run request, read its
reply from a broadcast stream; nothing else) and a run through the provider
(POST /runs on a kept-alive connection). The figures are p50 and p99 of the
provider's minus the bare one's, sequentially and with 32 in flight.
"""
import concurrent.futures
import json
import threading
import time
import uuid

import requests

from .common import EVENTS_TOKEN, WORKER_TOKEN, console_script, percentile, provider_env, token
from .events import RUN, RUN_REPLY

BATCH = int(__import__("os").environ.get("BENCH_ROUNDTRIP_BATCH", "200"))
BATCHES = 5


class BareBus:
    """Publish a run request and wait for its reply: the least any caller of the Events API does."""

    def __init__(self, url: str, bearer: str):
        self.url, self.headers = f"{url}/api/v1/events", {"Authorization": f"Bearer {bearer}"}
        self.waiting, self.lock = {}, threading.Lock()
        self.local = threading.local()
        self.stream = requests.get(f"{self.url}/stream", params={"name": RUN_REPLY, "delivery": "broadcast"},
                                   headers=self.headers, stream=True, timeout=(5, 300))
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        partial = b""
        try:
            while chunk := self.stream.raw.read1(65536):
                *lines, partial = (partial + chunk).split(b"\n")
                for line in lines:
                    if line.strip():
                        envelope = json.loads(line)
                        with self.lock:
                            event = self.waiting.pop(envelope.get("correlationId"), None)
                        if event is not None:
                            event.set()
        except Exception:  # the stream was shut down, or broke: either way this reader is done
            return

    def run(self, n: int) -> float:
        session = getattr(self.local, "session", None) or setattr(self.local, "session", requests.Session()) \
            or self.local.session
        correlation, event = str(uuid.uuid4()), threading.Event()
        with self.lock:
            self.waiting[correlation] = event
        started = time.perf_counter()
        payload = {"run_id": f"run_bare_{n}", "owner_account_id": "bench", "profile": "instant", "command": [str(n)]}
        session.post(self.url, json={"name": RUN, "correlationId": correlation, "payload": payload},
                     headers=self.headers, timeout=10).raise_for_status()
        if not event.wait(10):
            raise SystemExit("a bare publish got no reply")
        return time.perf_counter() - started

    def close(self):
        self.stream.raw.shutdown()  # wakes the reader's blocked read; close() alone would wait for it
        self.reader.join(5)
        self.stream.close()


class ProviderCaller:
    def __init__(self, url: str):
        self.url = f"{url}/api/v1/containers/runs"
        self.headers = {"Authorization": f"Bearer {token('bench-account', 'container:run')}"}
        self.local = threading.local()

    def run(self, n: int) -> float:
        session = getattr(self.local, "session", None) or setattr(self.local, "session", requests.Session()) \
            or self.local.session
        started = time.perf_counter()
        response = session.post(self.url, json={"profile": "instant", "args": [str(n)]}, headers=self.headers,
                                timeout=10)
        if response.status_code != 200 or response.json()["args"] != [str(n)]:
            raise SystemExit(f"a run through the provider failed: {response.status_code} {response.text[:200]}")
        return time.perf_counter() - started


def timed(caller, in_flight: int, count: int) -> list:
    if in_flight == 1:
        return [caller.run(n) for n in range(count)]
    with concurrent.futures.ThreadPoolExecutor(in_flight) as pool:
        return list(pool.map(caller.run, range(count)))


def measure(events_url: str, in_flights=(1, 32), batches: int = BATCHES, batch: int = BATCH) -> dict:
    # 32 kept-alive connections of one account: every thread may take a run, or a worker that accepted
    # more than 7/8 of them would answer 503 (run capacity), which is not what this measures.
    env = provider_env(BUS_API_TOKEN=EVENTS_TOKEN, BUS_EVENTS_LISTENER_RETRY="1", BUS_EVENTS_LISTENER_REQUIRED="1",
                       BUS_CONTAINERS_RESERVED_THREADS="0")
    results = {}
    with console_script("--backend", "events", "--events-url", events_url, "--workers", "2", "--threads", "32",
                        "--max-runs-per-account", "0", env=env) as provider:
        bare, ours = BareBus(events_url, WORKER_TOKEN), ProviderCaller(provider.url)
        try:
            for in_flight in in_flights:
                timed(bare, in_flight, 64), timed(ours, in_flight, 64)  # warm sessions and threads
                bare_times, our_times = [], []
                for _ in range(batches):
                    bare_times += timed(bare, in_flight, batch)
                    our_times += timed(ours, in_flight, batch)
                results[in_flight] = {
                    q: (percentile(our_times, q) - percentile(bare_times, q)) * 1000 for q in (0.5, 0.99)}
                results[in_flight]["bare"] = {q: percentile(bare_times, q) * 1000 for q in (0.5, 0.99)}
        finally:
            bare.close()
    return results


def run(table) -> dict:
    from .common import free_port
    from .events import fast_events
    from .inrepo import in_repo_events

    figures = {}
    with in_repo_events(free_port()) as url:
        figures["in-repo"] = measure(url)
    with fast_events(free_port(), [WORKER_TOKEN, EVENTS_TOKEN]) as url:
        figures["benchmark"] = measure(url)
    for server, by_flight in figures.items():
        for in_flight, f in by_flight.items():
            what = "sequential" if in_flight == 1 else f"{in_flight} in flight"
            table.add(f"round trip, {server} Events server, {what}: provider − bare publish→reply",
                      f"p50 {f[0.5]:+.2f} ms, p99 {f[0.99]:+.2f} ms (bare p50 {f['bare'][0.5]:.2f}, "
                      f"p99 {f['bare'][0.99]:.2f} ms)", "p50 ≤ 2 ms, p99 ≤ 10 ms",
                      f[0.5] <= 2 and f[0.99] <= 10)
    return figures


if __name__ == "__main__":
    from .common import Table

    table = Table()
    run(table)
    print(table.render())
