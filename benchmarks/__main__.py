"""`python -m benchmarks`: POST /runs against a bare Flask endpoint, and a thousand runs in flight.

1. Throughput: the provider (static backend, authenticated POST /runs) and a
   bare Flask endpoint, both under gunicorn with the same settings, loaded by
   wrk in alternating rounds; the figure is the median ratio provider/bare.
2. In flight: the provider with the events backend against the in-repo Events
   API test server, whose responder holds every run for a few seconds, while
   a thousand callers wait at once; the figures are how many succeeded and
   the provider's memory per in-flight run.
"""
import concurrent.futures
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import EVENTS_TOKEN, WORKER_TOKEN, token  # noqa: E402
from eventsapi import EventsServer, Responder  # noqa: E402
from processes import console_script, free_port, provider_env, running  # noqa: E402

BIN = Path(sys.executable).parent
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
SECONDS = os.environ.get("BENCH_SECONDS", "8")
IN_FLIGHT = int(os.environ.get("BENCH_IN_FLIGHT", "1000"))


def wrk(url: str) -> float:
    env = dict(os.environ, BENCH_TOKEN=token("bench-account", "container:run"))
    result = subprocess.run(["wrk", "-t1", "-c32", f"-d{SECONDS}s", "-s", str(ROOT / "benchmarks/post_run.lua"),
                             f"{url}/api/v1/containers/runs"], env=env, capture_output=True, text=True, timeout=120)
    if "non2xx=0 errors=0" not in result.stdout:
        raise SystemExit(f"wrk saw failures against {url}:\n{result.stdout}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", result.stdout).group(1))


def throughput() -> None:
    port = free_port()
    gunicorn = [str(BIN / "gunicorn"), "-c", "/dev/null", "--no-control-socket", "-k", "gthread", "-w", "1", "--threads", "32", "-b", f"127.0.0.1:{port}",
                "benchmarks.bare:app"]
    ratios = []
    with console_script("--workers", "1", "--threads", "32") as provider, \
            running(gunicorn, provider_env(), port, ready_path="/api/v1/containers/runs") as bare:
        wrk(provider.url), wrk(bare.url)  # warm both
        for n in range(ROUNDS):
            ours, theirs = wrk(provider.url), wrk(bare.url)
            ratios.append(ours / theirs)
            print(f"round {n + 1}: provider {ours:8.0f} req/s   bare flask {theirs:8.0f} req/s   "
                  f"ratio {ours / theirs:.2f}")
    print(f"authenticated POST /runs / bare Flask (median of {ROUNDS}): {statistics.median(ratios):.2f}  (target ≥ 0.80)")


def rss_kib(pid: int) -> int:
    """Resident memory of a process and its children (the gunicorn workers)."""
    total = 0
    pids = [pid] + [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                                                    text=True).stdout.split()]
    for one in pids:
        for line in Path(f"/proc/{one}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def in_flight() -> None:
    with EventsServer(tokens={EVENTS_TOKEN: None, WORKER_TOKEN: None}) as server, \
            Responder(server.url, WORKER_TOKEN):
        env = provider_env(BUS_API_TOKEN=EVENTS_TOKEN, BUS_EVENTS_LISTENER_RETRY="1",
                           BUS_EVENTS_LISTENER_REQUIRED="1")
        threads = str(max(32, IN_FLIGHT // 2 + 16))
        with console_script("--backend", "events", "--events-url", server.url, "--workers", "2",
                            "--threads", threads, env=env) as provider:
            time.sleep(1)
            idle = rss_kib(provider.pid)
            headers = {"Authorization": f"Bearer {token('bench-account', 'container:run')}"}
            body = {"profile": "sleep:5", "args": ["true"], "timeout_seconds": 30}
            peak, done = [idle], threading.Event()

            def sample():
                while not done.wait(0.25):
                    peak.append(rss_kib(provider.pid))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            started = time.monotonic()
            with concurrent.futures.ThreadPoolExecutor(max_workers=IN_FLIGHT) as pool:
                statuses = list(pool.map(lambda _: requests.post(f"{provider.url}/api/v1/containers/runs",
                                                                 json=body, headers=headers, timeout=60).status_code,
                                         range(IN_FLIGHT)))
            elapsed = time.monotonic() - started
            done.set()
            sampler.join(2)
        ok = statuses.count(200)
        print(f"{IN_FLIGHT} runs held 5 s each: {ok} succeeded in {elapsed:.1f} s "
              f"(ideal 5 s); others: {sorted(set(statuses) - {200})}")
        print(f"provider memory: idle {idle / 1024:.0f} MiB, peak {max(peak) / 1024:.0f} MiB, "
              f"{(max(peak) - idle) / max(ok, 1):.0f} KiB per in-flight run")


if __name__ == "__main__":
    throughput()
    in_flight()
