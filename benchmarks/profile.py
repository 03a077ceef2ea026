"""Where an events run's CPU goes: py-spy samples the thread holding the GIL while runs go through.

One provider worker (32 threads) on the benchmark Events API, 16 callers
sending instant runs on kept-alive connections; `py-spy record --gil`
samples only the thread holding the GIL (all its other threads wait), so the
shares below are of the Python work, not of time spent in the kernel. With
a thousand request threads py-spy cannot keep up (too few samples to read),
so this is the steady state, not the burst. The table gets the provider's
CPU per run and the parts of a run with the largest inclusive share; the
whole profile (collapsed stacks) is left in BENCH_PROFILE_OUT when set.
"""
import collections
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time

from .common import BIN, EVENTS_TOKEN, WORKER_TOKEN, console_script, cpu_seconds, free_port, provider_env, tree
from .events import fast_events
from .roundtrip import ProviderCaller, timed

SECONDS = 8
# The parts of a run worth naming, by the frame that starts each (inclusive share).
PARTS = {
    "gunicorn: parse the request, write the answer": ("ThreadWorker.handle",),
    "Flask: the request, its hooks and the view": ("Flask.wsgi_app",),
    "the view (create_run): schema, controls, the run": ("create_run",),
    "publishing the run request (requests)": ("EventsClient.publish",),
    "waiting for the reply, woken": ("Waiter.wait",),
    "reading reply streams (bus/listener.py)": ("_Reader.run",),
    "marshmallow (load and dump)": ("Schema.load", "Schema.dump"),
    "the request log line (logs.py)": ("_finish (bus_containers_provider/logs.py)",),
    "the worker's main loop (accept, heads, poller)": ("ThreadWorker.run",),
}


def shares(collapsed: str) -> tuple:
    """(samples, {part: share of samples whose stack passes through it})."""
    total, counts = 0, collections.Counter()
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        total += int(count)
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
        for part, starts in PARTS.items():
            if any(frame.startswith(start) for frame in frames for start in starts):
                counts[part] += int(count)
    return total, {part: counts[part] / max(total, 1) for part in PARTS}


def record(seconds: int = SECONDS) -> dict:
    spy = shutil.which("py-spy", path=str(BIN)) or shutil.which("py-spy")
    if spy is None:
        raise SystemExit("py-spy is not installed (make bench installs it)")
    env = provider_env(BUS_API_TOKEN=EVENTS_TOKEN, BUS_EVENTS_LISTENER_RETRY="1", BUS_EVENTS_LISTENER_REQUIRED="1")
    with fast_events(free_port(), [WORKER_TOKEN, EVENTS_TOKEN]) as url, \
            console_script("--backend", "events", "--events-url", url, "--workers", "1", "--threads", "32",
                           "--max-runs-per-account", "0", env=env) as provider, \
            tempfile.TemporaryDirectory() as scratch:
        caller = ProviderCaller(provider.url)
        timed(caller, 16, 200)  # warm
        pids, worker = tree(provider.pid), tree(provider.pid)[1]
        done, runs = threading.Event(), [0]

        def load():
            while not done.is_set():
                timed(caller, 16, 100)
                runs[0] += 100

        loader = threading.Thread(target=load)
        loader.start()
        time.sleep(0.5)
        before, counted = cpu_seconds(pids), runs[0]
        out = os.path.join(scratch, "profile.txt")
        try:
            subprocess.run([spy, "record", "--pid", str(worker), "--gil", "--rate", "200", "--duration",
                            str(seconds), "--format", "raw", "--output", out, "--nonblocking"],
                           capture_output=True, timeout=seconds + 60, check=True)
        finally:
            done.set()
            loader.join(60)
        cpu_ms = (cpu_seconds(pids) - before) / max(runs[0] - counted, 1) * 1000
        collapsed = open(out).read()
    if os.environ.get("BENCH_PROFILE_OUT"):
        with open(os.environ["BENCH_PROFILE_OUT"], "w") as kept:
            kept.write(collapsed)
    samples, parts = shares(collapsed)
    return {"cpu_ms": cpu_ms, "samples": samples, "parts": parts}


def run(table) -> dict:
    profile = record()
    table.add("profile: provider CPU per events run, 1 worker × 32 threads, 16 callers (steady state)",
              f"{profile['cpu_ms']:.2f} ms ({profile['samples']} GIL-held samples)")
    for part, share in sorted(profile["parts"].items(), key=lambda item: -item[1]):
        table.add(f"profile: {part}", f"{share * 100:.0f} % of GIL-held samples (inclusive: the parts nest)")
    return profile


if __name__ == "__main__":
    from .common import Table

    table = Table()
    run(table)
    print(table.render())
