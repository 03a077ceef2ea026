"""What --metrics-addr costs on POST /runs: server CPU per request with and without it.

Two providers with the same settings (static backend, 1 worker, 32 threads,
every thread free for runs, no per-account limit: every request comes from
one account), one with --metrics-addr, each loaded by its own wrk at the same time.
The one with metrics is scraped once a second during its rounds, more often
than a Prometheus would (15 s). CPU per request (master, worker and metrics
listener together) is the figure: another engineer's load on a shared
machine disturbs it far less than throughput.
"""
import concurrent.futures
import os
import threading

import requests

from .common import ROUNDS, console_script, cpu_seconds, free_port, median, percentile, provider_env, tree, wrk

SECONDS = int(os.environ.get("BENCH_SECONDS", "6"))
# A round's ratio scatters by ±15 % on a shared 2-core machine, several times the few per cent
# measured: the median needs more rounds than the other benchmarks.
METRICS_ROUNDS = int(os.environ.get("BENCH_METRICS_ROUNDS", str(max(ROUNDS, 15))))
TARGET = 0.05


def measured(server) -> tuple:
    """(requests per second, CPU µs per request) of one wrk round."""
    pids = tree(server.pid)  # the metrics listener is the master's child too
    before = cpu_seconds(pids)
    done = wrk(server.url, SECONDS)
    return done / SECONDS, (cpu_seconds(pids) - before) / done * 1e6


def scraping(url: str, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        requests.get(f"{url}/metrics", timeout=10).raise_for_status()


def scraped_round(server, metrics_addr: str) -> tuple:
    stop = threading.Event()
    scraper = threading.Thread(target=scraping, args=(f"http://{metrics_addr}", stop))
    scraper.start()
    try:
        return measured(server)
    finally:
        stop.set()
        scraper.join()


def run(table, rounds: int = METRICS_ROUNDS) -> dict:
    metrics_addr = f"127.0.0.1:{free_port()}"
    settings = ("--workers", "1", "--threads", "32", "--max-runs-per-account", "0")
    env = provider_env(BUS_CONTAINERS_RESERVED_THREADS="0")
    with console_script(*settings, env=env) as plain, \
            console_script(*settings, "--metrics-addr", metrics_addr, env=env) as metered:
        wrk(plain.url, 2), wrk(metered.url, 2)  # warm both
        rows = []
        for n in range(rounds):
            # Both sides loaded at the same time: whatever else the machine does falls on both alike.
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                without = pool.submit(measured, plain)
                with_metrics = pool.submit(scraped_round, metered, metrics_addr)
                without, with_metrics = without.result(), with_metrics.result()
            rows.append((without, with_metrics))
            print(f"    round {n + 1}: without {without[0]:6.0f} req/s {without[1]:5.0f} µs CPU/req   "
                  f"with --metrics-addr {with_metrics[0]:6.0f} req/s {with_metrics[1]:5.0f} µs CPU/req", flush=True)
        scraped = requests.get(f"http://{metrics_addr}/metrics", timeout=10).text
        if "bus_containers_http_requests_total" not in scraped:
            raise SystemExit("the provider with --metrics-addr counted no requests")
    # Rounds are paired (both sides loaded at once), so the figure is the median of the per-round
    # ratios; the middle half of them shows how far one round can stray.
    ratios = [w[1] / o[1] - 1 for o, w in rows]
    overhead = median(ratios)
    table.add("metrics: server CPU per POST /runs, with ÷ without --metrics-addr − 1",
              f"{overhead * 100:+.1f} % (median of {rounds} paired rounds; middle half "
              f"{percentile(ratios, 0.25) * 100:+.1f} to {percentile(ratios, 0.75) * 100:+.1f} %; "
              f"CPU per request ~{median(o[1] for o, _ in rows):.0f} µs)", "< 5 %", overhead < TARGET)
    return {"overhead": overhead}


if __name__ == "__main__":
    from .common import Table

    table = Table()
    run(table)
    print(table.render())
