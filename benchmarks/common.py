"""Shared pieces of the benchmarks: processes, their CPU and memory, wrk, and the result table."""
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import EVENTS_TOKEN, WORKER_TOKEN, token  # noqa: E402,F401
from processes import console_script, free_port, provider_env, running  # noqa: E402,F401

BIN = Path(sys.executable).parent
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
TICK = os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> list:
    """A process and its children (gunicorn's master and workers)."""
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [pid] + [int(p) for p in children]


def cpu_seconds(pids) -> float:
    """User + system CPU of `pids` so far (terminated ones count as 0)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICK


def rss_kib(pids) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def wrk(url: str, seconds: int, connections: int = 32, threads: int = 2, path: str = "/api/v1/containers/runs",
        script: str = "post_run.lua", bearer: str = None) -> int:
    """Requests completed by wrk in `seconds` of an authenticated request (the script's: by default
    POST /runs as bench-account); any failure stops the benchmark."""
    env = dict(os.environ, BENCH_TOKEN=bearer or token("bench-account", "container:run"))
    result = subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "-s",
                             str(ROOT / "benchmarks" / script), f"{url}{path}"],
                            env=env, capture_output=True, text=True, timeout=seconds + 60)
    if "non2xx=0 errors=0" not in result.stdout:
        raise SystemExit(f"wrk saw failures against {url}:\n{result.stdout}")
    return int(re.search(r"(\d+) requests in", result.stdout).group(1))


def percentile(values, q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def median(values) -> float:
    return statistics.median(values)


class Table:
    """The one table `make bench` prints: benchmark, figure, target, and whether the target is met."""

    HEAD = ("benchmark", "figure", "target", "met?")

    def __init__(self):
        self.rows = []
        self.errors = []  # benchmarks that saw failed requests: their figures measured refusals too

    def add(self, benchmark: str, figure: str, target: str = "", met=None) -> None:
        """`met`: True or False against `target`; None for a figure without one (shown beside another)."""
        verdict = "" if met is None else ("yes" if met else "NO")
        self.rows.append((benchmark, figure, target, verdict))
        print(f"  {benchmark}: {figure}" + (f"   (target {target}: {verdict})" if target else ""), flush=True)

    def error(self, benchmark: str, what: str) -> None:
        self.errors.append(f"{benchmark}: {what}")

    def render(self) -> str:
        widths = [max(len(row[i]) for row in self.rows + [self.HEAD]) for i in range(4)]
        line = "| " + " | ".join(f"{{:{w}}}" for w in widths) + " |"
        out = [line.format(*self.HEAD), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        out += [line.format(*row) for row in self.rows]
        return "\n".join(out)
