"""Apply each one-line change of issue 14's list to a scratch copy of the repo and run the tests that cover it.

Every change alters a behaviour CONTRACT.md pins, so at least one test must fail; the output is
`change: summary` and the failing tests (docs/testing.md keeps the last result).

Usage: .venv/bin/python tools/pinned_changes.py [CHANGE...]   (default: all of them)
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
P = "bus_containers_provider/"
# name: (file, [(text, replacement), ...], the test modules that cover the file)
CHANGES = {
    # §5: the waiter is registered after the request is published (a fast reply finds nobody).
    "waiter-after-publish": (P + "bus/__init__.py", [
        ("        waiter = self.registry.register(reply_name, correlation_id)\n        try:\n            try:\n"
         "                self.client.publish(request_name, correlation_id, payload)\n",
         "        waiter = None\n        try:\n            try:\n"
         "                self.client.publish(request_name, correlation_id, payload)\n"
         "                waiter = self.registry.register(reply_name, correlation_id)\n"),
        ("            self.registry.discard(waiter)",
         "            if waiter is not None:\n                self.registry.discard(waiter)")],
        ["tests/test_events.py", "tests/test_replies.py", "tests/test_bus_client.py"]),
    # §3: unowned (shared runner) items shown whole instead of reduced to id and state.
    "unowned-items-whole": (P + "backends/base.py", [
        ('visible.append({"id": item["id"], "state": item["state"]})', "visible.append(item)")],
        ["tests/test_replies.py", "tests/test_routes.py", "tests/test_events.py"]),
    # §5: an envelope `error` next to a well-formed payload relayed as a success.
    "error-with-payload-is-success": (P + "backends/events.py", [
        ("    if error is not None:\n        kind, message = error",
         '    if error is not None and not isinstance(envelope.get("payload"), dict):\n        kind, message = error')],
        ["tests/test_replies.py", "tests/test_events.py", "tests/test_reply_fuzz.py"]),
    # §6: a usage reply with `recorded: false` taken as recorded.
    "recorded-false-is-recorded": (P + "usage.py", [
        (' or (isinstance(payload, dict) and payload.get("recorded") is False)', "")],
        ["tests/test_replies.py", "tests/test_records.py", "tests/test_usage_billing.py"]),
    # §5/§6: a billing reply without `allowed` not refused as malformed.
    "billing-without-allowed-accepted": (P + "schemas.py", [
        ("allowed = StrictBoolean(required=True)", "allowed = StrictBoolean(load_default=True)")],
        ["tests/test_replies.py", "tests/test_usage_billing.py"]),
    # §1: a run without timeout_seconds waits only the grace, not --max-run-timeout + grace.
    "run-waits-only-the-grace": (P + "config.py", [
        ("return (timeout_seconds or self.max_run_timeout) + self.run_timeout_grace",
         "return (timeout_seconds or 0) + self.run_timeout_grace")],
        ["tests/test_replies.py", "tests/test_events.py"]),
    # §2: both sides of each pinned limit.
    "iat-skew-300": (P + "auth.py", [("IAT_SKEW_SECONDS = 60", "IAT_SKEW_SECONDS = 300")],
                     ["tests/test_auth_edges.py", "tests/test_auth.py"]),
    "iat-skew-59": (P + "auth.py", [("IAT_SKEW_SECONDS = 60", "IAT_SKEW_SECONDS = 59")],
                    ["tests/test_auth_edges.py", "tests/test_auth.py"]),
    "token-limit-10KiB": (P + "auth.py", [("MAX_TOKEN_BYTES = 8 * 1024", "MAX_TOKEN_BYTES = 10 * 1024")],
                          ["tests/test_auth_edges.py", "tests/test_auth.py"]),
    "token-limit-8KiB-minus-1": (P + "auth.py", [("MAX_TOKEN_BYTES = 8 * 1024", "MAX_TOKEN_BYTES = 8 * 1024 - 1")],
                                 ["tests/test_auth_edges.py", "tests/test_auth.py"]),
    "exp-nbf-leeway-1s": (P + "auth.py", [("self._claims = _Claims(now=lambda: int(clock()),",
                                           "self._claims = _Claims(now=lambda: int(clock()), leeway=1,")],
                          ["tests/test_auth_edges.py", "tests/test_auth.py"]),
    # §1: listener retry without exponential backoff (RETRY_MIN/RETRY_MAX).
    "no-exponential-backoff": (P + "bus/listener.py", [
        ("delay = min(delay * 2, self._retry_max)", "delay = self._retry_min")],
        ["tests/test_events.py", "tests/test_streams.py"]),
    # §1: the events backend defaulting to one worker instead of two.
    "events-one-worker": (P + "config.py", [('return 1 if self.backend == "static" else 2', "return 1")],
                          ["tests/test_replies.py", "tests/test_cli.py"]),
    # §3: an unexpected error answered by Flask's HTML 500.
    "html-500": (P + "errors.py", [("    app.register_error_handler(Exception, _unexpected)\n", "")],
                 ["tests/test_replies.py", "tests/test_errors.py"]),
}

def check(name) -> bool:
    """True when at least one covering test fails with the change applied."""
    path, edits, tests = CHANGES[name]
    with tempfile.TemporaryDirectory(prefix=f"change-{name}-") as work:
        shutil.copytree(ROOT, work, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
            ".venv", "mutants", ".git", "__pycache__", ".hypothesis", "*.egg-info", ".pytest_cache"))
        with open(os.path.join(work, path)) as source:
            text = source.read()
        for old, new in edits:
            if old not in text:
                sys.exit(f"{name}: {path} no longer contains {old!r}; update this list")
            text = text.replace(old, new)
        with open(os.path.join(work, path), "w") as source:
            source.write(text)
        # The copy comes first on the path, for this process and for the gunicorn children it starts.
        env = dict(os.environ, PYTHONPATH=work)
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", *tests],
                             cwd=work, env=env, capture_output=True, text=True).stdout
    failed = sorted(set(re.findall(r"^FAILED (\S+)", out, re.M)))
    print(f"{name}: {out.strip().splitlines()[-1] if out.strip() else 'no output'}", flush=True)
    for test in failed:
        print("   ", test, flush=True)
    return bool(failed)


def main(names) -> int:
    unknown = [name for name in names if name not in CHANGES]
    if unknown:
        sys.exit(f"unknown change(s): {' '.join(unknown)}; known: {' '.join(CHANGES)}")
    missed = [name for name in names or CHANGES if not check(name)]
    if missed:
        print(f"no test failed for: {' '.join(missed)}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
