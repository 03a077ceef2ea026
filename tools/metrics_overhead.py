"""What --metrics-addr costs on POST /runs: `.venv/bin/python tools/metrics_overhead.py`.

The measurement is benchmarks/metrics.py (also a row of `make bench`); this
runs it alone. Needs wrk (`make bench` installs it).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import metrics  # noqa: E402
from benchmarks.common import Table  # noqa: E402

if __name__ == "__main__":
    table = Table()
    metrics.run(table)
    print(table.render())
