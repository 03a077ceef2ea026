"""`python -m benchmarks` (`make bench`): every benchmark, bounded, on 127.0.0.1; one table at the end.

Each module runs alone too (`python -m benchmarks.overhead`, ...); BENCHMARKS.md
records the latest figures. BENCH_ROUNDS and BENCH_SECONDS shorten or
lengthen the wrk rounds; BENCH_ONLY=overhead,capacity runs a subset. A new
benchmark is a module with `run(table)`, added to BENCHMARKS below.
A benchmark whose requests failed (anything but 200) makes the run exit
non-zero after the table: its figures measured refusals, not the provider.
"""
import os
import platform
import sys
import time

from . import capacity, detached, fanout, metrics, overhead, profile, registry, roundtrip
from .common import Table

BENCHMARKS = {"overhead": overhead.run, "metrics": metrics.run, "roundtrip": roundtrip.run,
              "capacity": capacity.run, "fanout": fanout.run, "profile": profile.run, "registry": registry.run,
              "detached": detached.run}


def main() -> int:
    only = [n for n in os.environ.get("BENCH_ONLY", "").split(",") if n] or list(BENCHMARKS)
    unknown = set(only) - set(BENCHMARKS)
    if unknown:
        raise SystemExit(f"BENCH_ONLY: unknown benchmarks {sorted(unknown)}; known: {list(BENCHMARKS)}")
    table = Table()
    started = time.monotonic()
    for name in only:
        print(f"{name}:", flush=True)
        try:
            BENCHMARKS[name](table)
        except (Exception, SystemExit) as exc:  # one broken benchmark still leaves the others' figures
            table.add(name, f"failed: {str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__}",
                      "runs", False)
            table.error(name, str(exc) or type(exc).__name__)
    print(f"\n{os.cpu_count()} CPUs, {platform.python_implementation()} {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {time.monotonic() - started:.0f} s\n")
    print(table.render())
    for failure in table.errors:
        print(f"FAILED REQUESTS: {failure}", file=sys.stderr)
    return 1 if table.errors else 0


if __name__ == "__main__":
    sys.exit(main())
