"""What --metrics-addr costs on POST /runs: `.venv/bin/python tools/metrics_overhead.py`.

Two providers with the same settings (static backend, gunicorn gthread, 1
worker, 32 threads), one with --metrics-addr and one without, loaded by wrk in
alternating rounds; the figure is the median throughput ratio with/without.
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


def wrk(url: str, script: str) -> float:
    env = dict(os.environ, BENCH_TOKEN=token("bench-account", "container:run"))
    result = subprocess.run(["wrk", "-t1", "-c32", f"-d{SECONDS}s", "-s", script, f"{url}/api/v1/containers/runs"],
                            env=env, capture_output=True, text=True, timeout=120)
    if "non2xx=0 errors=0" not in result.stdout:
        raise SystemExit(f"wrk saw failures against {url}:\n{result.stdout}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", result.stdout).group(1))


def scraping(url: str, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        requests.get(f"{url}/metrics", timeout=10).raise_for_status()


def main() -> int:
    metrics_addr = f"127.0.0.1:{free_port()}"
    settings = ("--workers", "1", "--threads", "32")
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script, \
            console_script(*settings) as plain, console_script(*settings, "--metrics-addr", metrics_addr) as metered:
        script.write(SCRIPT)
        script.flush()
        wrk(plain.url, script.name), wrk(metered.url, script.name)  # warm both
        ratios = []
        for n in range(ROUNDS):
            without = wrk(plain.url, script.name)
            stop = threading.Event()
            scraper = threading.Thread(target=scraping, args=(f"http://{metrics_addr}", stop))
            scraper.start()
            try:
                with_metrics = wrk(metered.url, script.name)
            finally:
                stop.set()
                scraper.join()
            ratios.append(with_metrics / without)
            print(f"round {n + 1}: without {without:8.0f} req/s   with --metrics-addr {with_metrics:8.0f} req/s   "
                  f"ratio {with_metrics / without:.3f}")
        scraped = requests.get(f"http://{metrics_addr}/metrics", timeout=10).text
        assert "bus_containers_http_requests_total" in scraped
    median = statistics.median(ratios)
    print(f"POST /runs with/without --metrics-addr (median of {ROUNDS}): {median:.3f}  "
          f"overhead {(1 - median) * 100:.1f} %  (target < 5 %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
