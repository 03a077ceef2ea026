"""What --metrics-addr costs on POST /runs: `.venv/bin/python tools/metrics_overhead.py`.

Two providers with the same settings (static backend, gunicorn gthread, 1
worker, 32 threads, no per-account limit: every request comes from one
account), one with --metrics-addr and one without, loaded by wrk with 24
connections (below the worker's run capacity of 28) in alternating rounds. Two figures: the median throughput ratio with/without,
and the provider's CPU time per request (master, worker and metrics listener
together), which the other load on a shared machine disturbs far less.
The provider with metrics is scraped once a second during its rounds, as a
Prometheus would be (more often than the usual 15 s). Needs wrk
(`make bench` installs it).
"""
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import token  # noqa: E402
from processes import console_script, free_port  # noqa: E402

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
SECONDS = os.environ.get("BENCH_SECONDS", "8")
SCRIPT = """\
wrk.method = "POST"
wrk.body = '{"image":"alpine:latest","command":["sh","-c","printf OK"],"timeout_seconds":60}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_TOKEN")
done = function(summary, latency, requests)
  io.write(string.format("non2xx=%d errors=%d\\n", summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
"""


def cpu_seconds(pid: int) -> float:
    """User + system CPU of `pid` and every live descendant."""
    total, tick = 0.0, os.sysconf("SC_CLK_TCK")
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    total += (int(fields[11]) + int(fields[12])) / tick
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        total += cpu_seconds(int(child))
    return total


def wrk(url: str, script: str) -> tuple:
    env = dict(os.environ, BENCH_TOKEN=token("bench-account", "container:run"))
    result = subprocess.run(["wrk", "-t1", "-c24", f"-d{SECONDS}s", "-s", script, f"{url}/api/v1/containers/runs"],
                            env=env, capture_output=True, text=True, timeout=120)
    if "non2xx=0 errors=0" not in result.stdout:
        raise SystemExit(f"wrk saw failures against {url}:\n{result.stdout}")
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", result.stdout).group(1))
    return rate, int(re.search(r"(\d+) requests in", result.stdout).group(1))


def measured(process, url: str, script: str) -> tuple:
    """(requests/s, CPU µs per request) of one wrk round."""
    before = cpu_seconds(process.pid)
    rate, count = wrk(url, script)
    return rate, (cpu_seconds(process.pid) - before) / count * 1e6


def scraping(url: str, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        requests.get(f"{url}/metrics", timeout=10).raise_for_status()


def main() -> int:
    metrics_addr = f"127.0.0.1:{free_port()}"
    settings = ("--workers", "1", "--threads", "32", "--max-runs-per-account", "0")
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script, \
            console_script(*settings) as plain, console_script(*settings, "--metrics-addr", metrics_addr) as metered:
        script.write(SCRIPT)
        script.flush()
        wrk(plain.url, script.name), wrk(metered.url, script.name)  # warm both
        ratios, cpu = [], {"without": [], "with": []}
        for n in range(ROUNDS):
            without, cpu_without = measured(plain, plain.url, script.name)
            stop = threading.Event()
            scraper = threading.Thread(target=scraping, args=(f"http://{metrics_addr}", stop))
            scraper.start()
            try:
                with_metrics, cpu_with = measured(metered, metered.url, script.name)
            finally:
                stop.set()
                scraper.join()
            ratios.append(with_metrics / without)
            cpu["without"].append(cpu_without)
            cpu["with"].append(cpu_with)
            print(f"round {n + 1}: without {without:6.0f} req/s {cpu_without:6.0f} µs CPU/req   "
                  f"with --metrics-addr {with_metrics:6.0f} req/s {cpu_with:6.0f} µs CPU/req   "
                  f"ratio {with_metrics / without:.3f}")
        scraped = requests.get(f"http://{metrics_addr}/metrics", timeout=10).text
        assert "bus_containers_http_requests_total" in scraped
    median = statistics.median(ratios)
    cpu_without, cpu_with = statistics.median(cpu["without"]), statistics.median(cpu["with"])
    print(f"POST /runs throughput with/without --metrics-addr (median of {ROUNDS}): {median:.3f}")
    print(f"CPU per POST /runs (median of {ROUNDS}): {cpu_without:.0f} µs without, {cpu_with:.0f} µs with "
          f"--metrics-addr: overhead {(cpu_with / cpu_without - 1) * 100:.1f} %  (target < 5 %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
