"""Overhead: authenticated POST /runs (static backend) against a bare Flask endpoint.

Both run under gunicorn gthread with the same workers and threads; wrk loads
them in alternating rounds (A/B/A/B). Figures: the median throughput ratio
provider/bare and, beside it, the ratio of server CPU per request.
"""
import os

from .common import BIN, ROUNDS, console_script, cpu_seconds, median, provider_env, running, free_port, tree, wrk

SECONDS = int(os.environ.get("BENCH_SECONDS", "6"))
WORKERS, THREADS = "2", "32"


def bare_server():
    port = free_port()
    command = [str(BIN / "gunicorn"), "-c", "/dev/null", "--no-control-socket", "-k", "gthread", "-w", WORKERS,
               "--threads", THREADS, "-b", f"127.0.0.1:{port}", "benchmarks.bare:app"]
    return running(command, provider_env(), port, ready_path="/api/v1/containers/runs")


def static_provider():
    """The provider with the static backend, as the overhead rounds load it."""
    # One account, 32 connections: no per-account limit, and every thread may take a run (the bare
    # endpoint reserves none either), so no round measures 429s or 503s.
    env = provider_env(BUS_CONTAINERS_RESERVED_THREADS="0")
    return console_script("--workers", WORKERS, "--threads", THREADS, "--max-runs-per-account", "0", env=env)


def measure(server, **request) -> tuple:
    """(requests per second, server CPU µs per request) for one wrk round (`request`: wrk's path, script, bearer)."""
    pids = tree(server.pid)
    before = cpu_seconds(pids)
    done = wrk(server.url, SECONDS, **request)
    return done / SECONDS, (cpu_seconds(pids) - before) / done * 1e6


def run(table, rounds: int = ROUNDS) -> dict:
    with static_provider() as provider, bare_server() as bare:
        wrk(provider.url, 2), wrk(bare.url, 2)  # warm both
        rows = []
        for n in range(rounds):
            ours, theirs = measure(provider), measure(bare)
            rows.append((ours, theirs))
            print(f"    round {n + 1}: provider {ours[0]:6.0f} req/s {ours[1]:5.0f} µs CPU/req   "
                  f"bare {theirs[0]:6.0f} req/s {theirs[1]:5.0f} µs CPU/req   ratio {ours[0] / theirs[0]:.2f}",
                  flush=True)
    ratio = median(o[0] / t[0] for o, t in rows)
    cpu_ratio = median(o[1] / t[1] for o, t in rows)
    table.add("overhead: POST /runs req/s ÷ bare Flask", f"{ratio:.2f} (median of {rounds})", "≥ 0.80",
              ratio >= 0.80)
    table.add("overhead: server CPU/request, provider ÷ bare",
              f"{cpu_ratio:.2f} ({median(o[1] for o, _ in rows):.0f} vs {median(t[1] for _, t in rows):.0f} µs)")
    return {"ratio": ratio, "cpu_ratio": cpu_ratio}


if __name__ == "__main__":
    from .common import Table

    run(Table())
