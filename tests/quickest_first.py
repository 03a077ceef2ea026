"""pytest plugin for `make mutation` only ([mutmut] pytest_add_cli_args): run the quickest tests first.

mutmut runs each mutant's tests with -x, in no particular order, and stops at the first failure.
Code on the listener's threads is credited to every test that started an app, so a mutant of it
is judged by some 70 tests and some 70 seconds; ordered by the durations mutmut recorded in its
stats run, the focused unit tests (tests/test_listener.py, tests/test_bus_client.py) come first
and most mutants fail in the first seconds. Which tests run, and so every verdict, is unchanged.
"""
import json
from pathlib import Path

# mutmut runs pytest inside mutants/, next to the stats it wrote.
STATS = Path("mutmut-stats.json")


def pytest_collection_modifyitems(session, config, items):
    try:
        durations = json.loads(STATS.read_text())["duration_by_test"]
    except (OSError, ValueError, KeyError):
        return  # the stats run itself, or a run outside mutmut: collection order
    items.sort(key=lambda item: durations.get(item.nodeid, 0.0))
