"""Print the mutation score and the surviving mutants of the last `mutmut run` (see docs/testing.md).

Usage: python tools/mutation_report.py MODULE... (dotted under bus_containers_provider, e.g. auth backends bus.replies)
       python tools/mutation_report.py --not-run MODULE...   (the names of the mutants not killed yet: left
       unrun by a time bound, survived, or without tests; for `make mutation RESUME=1`)
"""
import json
import sys
from collections import Counter
from pathlib import Path

PACKAGE = "bus_containers_provider"
# mutmut's exit codes, by what they mean for the score.
KILLED = {1, 3, 37}
TIMEOUT = {24, -24, 36, 152, 255}
SURVIVED = {0}
NO_TESTS = {5, 33}


def results(prefixes):
    for meta in sorted(Path("mutants", PACKAGE).rglob("*.meta")):
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            if any(name.startswith(prefix) for prefix in prefixes):
                yield name, code


def main(modules):
    not_run = modules[:1] == ["--not-run"]
    modules = modules[1:] if not_run else modules
    prefixes = [f"{PACKAGE}.{module}." for module in modules] or [f"{PACKAGE}."]
    found = list(results(prefixes))
    if not_run:
        print(" ".join(name for name, code in found if code is None or code in SURVIVED | NO_TESTS))
        return 0
    if not found:
        print("no mutation results: run `make mutation` first")
        return 1
    outcome = Counter()
    by_module = {}
    survivors = []
    for name, code in found:
        kind = ("killed" if code in KILLED else "timeout" if code in TIMEOUT else "survived" if code in SURVIVED
                else "no tests" if code in NO_TESTS else "not run" if code is None else "suspicious")
        outcome[kind] += 1
        module = name.split(".x")[0]
        by_module.setdefault(module, Counter())[kind] += 1
        if kind in ("survived", "no tests", "suspicious"):
            survivors.append((name, kind))
    print("surviving mutants (show one with `.venv/bin/mutmut show NAME`):")
    for name, kind in survivors:
        print(f"  {kind:10} {name}")
    print()
    for module, counts in sorted(by_module.items()):
        print(f"  {module:45} " + "  ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    judged = outcome["killed"] + outcome["timeout"] + outcome["survived"] + outcome["no tests"] + outcome["suspicious"]
    score = 100.0 * (outcome["killed"] + outcome["timeout"]) / judged if judged else 0.0
    print(f"\nmutation score: {score:.1f}% ({outcome['killed'] + outcome['timeout']} killed of {judged} run; "
          f"{outcome['not run']} not run in the time bound)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
