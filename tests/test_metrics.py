"""CONTRACT §8 through real gunicorn processes: /metrics on its own address, summed over every worker.

Each provider here runs under gunicorn with two workers and --metrics-addr;
requests go over fresh connections, so the kernel hands them to either
worker, and the tests read each worker's own file in the multiprocess
directory to see that both served.
"""
import concurrent.futures
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from conftest import EVENTS_TOKEN, SECRET, bearer, env, events_env, token
from processes import ROOT, SCRIPT, console_script, free_port, gunicorn_conf, provider_env

RUNS = "/api/v1/containers/runs"
RUN_ROUTE = "/api/v1/containers/runs/{run_id}"
REPLY_NAMES = [f"bus.containers.{name}.response"
               for name in ("status", "run", "delete", "runner.status", "runner.start", "runner.delete")]
LISTENER_LINE = re.compile(r"metrics on http://(?P<addr>\S+)/metrics \(listener pid (?P<pid>\d+)\), "
                           r"aggregated from (?P<dir>\S+)")


# --- helpers -----------------------------------------------------------------

def scrape(url: str) -> dict:
    """{(sample name, ((label, value), ...)): value} from one GET /metrics."""
    response = requests.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def requests_total(samples, route, method, status) -> float:
    return value(samples, "bus_containers_http_requests_total", route=route, method=method, status=str(status))


def per_worker(directory: str, name: str, **labels) -> dict:
    """{pid: value} of one counter sample, read from each worker's own file."""
    counts = {}
    for path in Path(directory).glob("counter_*.db"):
        pid = int(path.stem.split("_")[-1])
        for family in MultiProcessCollector.merge([str(path)]):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    counts[pid] = sample.value
    return counts


def worker_pids(master: int, exporter: int) -> set:
    """The master's children except the metrics listener: its workers."""
    with contextlib.suppress(FileNotFoundError):
        children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
        return {int(pid) for pid in children} - {exporter}
    return set()


def wait_for(condition, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return result


def fresh_post(url, account="acct-a", body=None, headers=None):
    """One run over a new connection (no session, Connection: close), so either worker may take it."""
    return requests.post(f"{url}{RUNS}", json=body or {"profile": "codex"}, timeout=30,
                         headers={**bearer(account), "Connection": "close", **(headers or {})})


def with_metrics(process):
    found = wait_for(lambda: LISTENER_LINE.search(process.log()), what="the metrics listener line")
    process.metrics_url = f"http://{found['addr']}"
    process.metrics_dir = found["dir"]
    process.exporter_pid = int(found["pid"])
    return process


@contextlib.contextmanager
def metrics_provider(*args, env=None):
    """The console script with two workers and --metrics-addr on a free port."""
    with console_script("--workers", "2", "--metrics-addr", f"127.0.0.1:{free_port()}", *args,
                        env=env or provider_env()) as process:
        yield with_metrics(process)


def events_process_env(server, **extra):
    listener = {k: v for k, v in events_env(server).items() if k.startswith("BUS_EVENTS_LISTENER")}
    return provider_env(BUS_API_TOKEN=EVENTS_TOKEN, BUS_CONTAINERS_BACKEND="events", BUS_EVENTS_API_URL=server.url,
                        BUS_CONTAINERS_RUN_TIMEOUT_GRACE="2s", **listener, **extra)


def until_both_workers_served(provider, batch=20):
    """POST runs in concurrent batches over fresh connections until each worker has answered some."""
    sent = 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=batch) as pool:
        for _ in range(10):
            # One run per account at a time: 20 at once from one account would meet its limit of 4.
            statuses = list(pool.map(lambda n: fresh_post(provider.url, f"acct-{n}").status_code, range(batch)))
            assert statuses == [200] * batch
            sent += batch
            counts = per_worker(provider.metrics_dir, "bus_containers_http_requests_total",
                                route=RUNS, method="POST", status="200")
            if len([c for c in counts.values() if c > 0]) == 2:
                return sent, counts
    raise AssertionError(f"one worker answered every run: {counts}")


# --- tests -------------------------------------------------------------------

def test_counters_sum_over_both_workers_with_route_patterns():
    with metrics_provider() as provider:
        sent, counts = until_both_workers_served(provider)
        run_id = fresh_post(provider.url).json()["run_id"]
        sent += 1
        read = requests.get(f"{provider.url}{RUNS}/{run_id}", headers={**bearer(), "Connection": "close"}, timeout=10)
        unknown = requests.get(f"{provider.url}/api/v1/containers/nowhere/{run_id}", headers=bearer(), timeout=10)
        samples = scrape(provider.metrics_url)

        assert sum(counts.values()) == sent - 1  # the per-file reads saw what the scrape adds up
        assert requests_total(samples, RUNS, "POST", 200) == sent
        assert value(samples, "bus_containers_runs_total", status="succeeded") == sent
        assert value(samples, "bus_containers_http_request_duration_seconds_count", route=RUNS, method="POST") == sent
        assert value(samples, "bus_containers_runs_in_flight") == 0
        # The static backend keeps runs per worker, so the read is a 200 or a 404 by who answers it.
        assert requests_total(samples, RUN_ROUTE, "GET", read.status_code) == 1
        assert unknown.status_code == 404
        assert requests_total(samples, "unmatched", "GET", 404) == 1
        assert not any(run_id in str(key) for key in samples)
        routes = {dict(labels).get("route") for _, labels in samples}
        assert routes <= {None, RUNS, RUN_ROUTE, "/readyz", "unmatched"}

        # /metrics is only on its own address; the public one answers it as any unknown route.
        public = requests.get(f"{provider.url}/metrics", timeout=10)
        assert public.status_code == 404 and public.json()["error"]["type"] == "not_found"
        other = requests.get(f"{provider.metrics_url}/", timeout=10)
        assert other.status_code == 404 and other.json()["error"]["type"] == "not_found"
        post = requests.post(f"{provider.metrics_url}/metrics", timeout=10)
        assert post.status_code == 405 and post.headers["Allow"] == "GET, HEAD"
        directory = provider.metrics_dir
    # The directory belongs to that start only, and the listener goes with the master.
    assert not os.path.exists(directory)
    assert not Path(f"/proc/{provider.exporter_pid}").exists()


def test_in_flight_gauge_rises_during_a_held_run_and_returns_to_zero(events_server, responder):
    with metrics_provider(env=events_process_env(events_server)) as provider:
        wait_for(lambda: all(value(scrape(provider.metrics_url), "bus_containers_events_listener_connected",
                                   event=name) == 1 for name in REPLY_NAMES), what="every listener connected")
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            held = pool.submit(fresh_post, provider.url, "acct-a", {"profile": "sleep:2", "args": ["echo", "held"]})
            # Published means admitted: the gauge went up before the request left.
            events_server.wait_published("bus.containers.run.request", timeout=10)
            during = scrape(provider.metrics_url)
            answer = held.result(timeout=30)
        after = scrape(provider.metrics_url)

    assert answer.status_code == 200, answer.text
    assert value(during, "bus_containers_runs_in_flight") == 1
    assert value(during, "bus_containers_runs_total", status="succeeded") == 0
    assert value(after, "bus_containers_runs_in_flight") == 0
    assert value(after, "bus_containers_runs_total", status="succeeded") == 1
    replies = value(after, "bus_containers_events_reply_seconds_count", event="bus.containers.run.response")
    assert replies == 1
    assert value(after, "bus_containers_events_reply_seconds_sum", event="bus.containers.run.response") >= 2
    # The held reply came after 2 s: it is past the 1 s bucket and within the 2.5 s one.
    assert value(after, "bus_containers_events_reply_seconds_bucket", event="bus.containers.run.response",
                 le="1.0") == 0
    assert value(after, "bus_containers_events_reply_seconds_bucket", event="bus.containers.run.response",
                 le="2.5") == 1


def test_a_detached_run_counts_as_detached_in_flight_until_it_finishes(events_server, responder):
    with metrics_provider(env=events_process_env(events_server)) as provider:
        wait_for(lambda: all(value(scrape(provider.metrics_url), "bus_containers_events_listener_connected",
                                   event=name) == 1 for name in REPLY_NAMES), what="every listener connected")
        headers = dict(bearer("acct-a"), Prefer="respond-async")
        accepted = requests.post(f"{provider.url}{RUNS}", headers=headers, timeout=10,
                                 json={"profile": "sleep:2", "args": ["echo", "detached"]})
        assert accepted.status_code == 202, accepted.text
        during = scrape(provider.metrics_url)
        finished = requests.get(f"{provider.url}{RUNS}/{accepted.json()['id']}", timeout=30,
                                headers=dict(bearer("acct-a"), Prefer="wait=20")).json()
        assert finished["state"] == "finished", finished
        wait_for(lambda: value(scrape(provider.metrics_url), "bus_containers_runs_detached_in_flight") == 0,
                 what="the detached gauge back to 0")
        after = scrape(provider.metrics_url)
    assert value(during, "bus_containers_runs_detached_in_flight") == 1
    assert value(during, "bus_containers_runs_in_flight") == 1
    assert value(after, "bus_containers_runs_in_flight") == 0
    assert value(after, "bus_containers_runs_total", status="succeeded") == 1
    # Completed by the process that published it: nothing was adopted.
    assert value(after, "bus_containers_runs_adopted_total") == 0


def test_a_killed_worker_replaced_keeps_its_counts_and_drops_its_gauges():
    with metrics_provider() as provider:
        sent, counts = until_both_workers_served(provider)
        assert requests_total(scrape(provider.metrics_url), RUNS, "POST", 200) == sent
        workers = worker_pids(provider.pid, provider.exporter_pid)
        assert workers == set(counts), (workers, counts)
        victim = max(counts, key=counts.get)
        live_gauge = Path(provider.metrics_dir) / f"gauge_livesum_{victim}.db"
        assert live_gauge.exists()

        os.kill(victim, signal.SIGKILL)
        # Replaced, and child_exit has removed the dead worker's live gauges.
        wait_for(lambda: len(worker_pids(provider.pid, provider.exporter_pid) - {victim}) == 2
                 and not live_gauge.exists(), what="the worker to be replaced")
        after_kill = scrape(provider.metrics_url)
        # Every request the dead worker had answered stays counted, once.
        assert requests_total(after_kill, RUNS, "POST", 200) == sent
        assert value(after_kill, "bus_containers_runs_total", status="succeeded") == sent

        more = 10
        assert all(fresh_post(provider.url).status_code == 200 for _ in range(more))
        final = scrape(provider.metrics_url)
        assert requests_total(final, RUNS, "POST", 200) == sent + more
        assert value(final, "bus_containers_runs_in_flight") == 0


def test_a_full_scrape_carries_no_account_run_id_token_env_or_stdin(events_server, responder):
    markers = {"account": "acct-marker-account-7f3a", "env": "env-marker-value-91c2",
               "env_name": "ENV_MARKER_NAME_44B1", "stdin": "stdin-marker-5d8e", "key": "idem-marker-3c6a",
               "args": "args-marker-0e27"}
    caller = {"Authorization": f"Bearer {token(markers['account'])}", "Connection": "close"}
    with metrics_provider(env=events_process_env(events_server)) as provider:
        run_input = {"env": {markers["env_name"]: markers["env"]}, "stdin": markers["stdin"]}
        body = {"image": "alpine", "command": ["echo", markers["args"]], "timeout_seconds": 5, **run_input}
        first = requests.post(f"{provider.url}{RUNS}", json=body, timeout=30,
                              headers={**caller, "Idempotency-Key": markers["key"]})
        assert first.status_code == 200, first.text
        run_id = first.json()["run_id"]
        requests.post(f"{provider.url}{RUNS}", json=body, timeout=30, headers={**caller, "Idempotency-Key": markers["key"]})
        requests.get(f"{provider.url}{RUNS}/{run_id}", headers=caller, timeout=10)
        requests.delete(f"{provider.url}{RUNS}/{run_id}", headers=caller, timeout=10)
        requests.get(f"{provider.url}/api/v1/{markers['account']}/{run_id}", headers=caller, timeout=10)
        requests.post(f"{provider.url}{RUNS}", json={"profile": "never", "timeout_seconds": 1, **run_input},
                      headers=caller, timeout=30)
        text = requests.get(f"{provider.metrics_url}/metrics", timeout=10).text
    assert "bus_containers_http_requests_total" in text and "bus_containers_runs_total" in text
    for marker in [*markers.values(), run_id, caller["Authorization"].split()[1], EVENTS_TOKEN, SECRET]:
        assert marker not in text


def test_denials_timeouts_and_a_dropped_listener_are_counted(events_server, responder):
    usage_and_billing = {"BUS_CONTAINERS_BILLING_BACKEND": "events", "BUS_CONTAINERS_USAGE_BACKEND": "events"}
    names = [*REPLY_NAMES, "bus.usage.record.response", "bus.billing.entitlement.check.response"]
    responder.billing["acct-unpaid"] = {"allowed": False, "reason": "billing_required", "action": "setup_billing"}
    responder.billing["acct-odd"] = {"allowed": False, "reason": "billing_required", "action": "odd-action-marker"}
    with metrics_provider(env=events_process_env(events_server, **usage_and_billing)) as provider:
        connected = lambda: {name: value(scrape(provider.metrics_url), "bus_containers_events_listener_connected",
                                         event=name) for name in names}
        wait_for(lambda: set(connected().values()) == {1}, what="every listener connected")
        assert fresh_post(provider.url, "acct-unpaid").status_code == 402
        assert fresh_post(provider.url, "acct-odd").status_code == 402
        timed_out = fresh_post(provider.url, "acct-a", {"profile": "never", "timeout_seconds": 1})
        assert timed_out.status_code == 503
        counted = scrape(provider.metrics_url)

        # Every stream of one reply name drops and cannot reopen: each worker's gauge goes to 0.
        events_server.fail_streams(503)
        events_server.drop_streams("bus.containers.status.response")
        wait_for(lambda: connected()["bus.containers.status.response"] == 0, what="the listener state to drop")
        reconnects = lambda: value(scrape(provider.metrics_url), "bus_containers_events_listener_reconnects_total",
                                   event="bus.containers.status.response")
        wait_for(lambda: reconnects() >= 2, what="reconnect attempts")
        assert connected()["bus.containers.run.response"] == 1
        events_server.reset_faults()
        wait_for(lambda: set(connected().values()) == {1}, what="the listener to come back")
        text = requests.get(f"{provider.metrics_url}/metrics", timeout=10).text

    assert value(counted, "bus_containers_billing_denials_total", action="setup_billing") == 1
    assert value(counted, "bus_containers_billing_denials_total", action="other") == 1
    assert value(counted, "bus_containers_events_reply_timeouts_total", event="bus.containers.run.response") == 1
    assert value(counted, "bus_containers_runs_total", status="error") == 1
    assert value(counted, "bus_containers_runs_in_flight") == 0
    # The run that timed out published a usage record first; the denied ones never got that far.
    assert value(counted, "bus_containers_events_reply_seconds_count", event="bus.usage.record.response") >= 1
    assert value(counted, "bus_containers_events_reply_seconds_count",
                 event="bus.billing.entitlement.check.response") == 3
    assert "odd-action-marker" not in text and "acct-unpaid" not in text


def test_usage_records_lost_and_pending_are_counted(events_server, responder, tmp_path):
    """A real EventsUsage in a process with the multiprocess directory set, against the real Events API."""
    responder.refuse_usage["container_run_finished"] = 100
    responder.hold_usage.add("container_run_failed")
    probe = """
import sys, time
from prometheus_client import CollectorRegistry, generate_latest, multiprocess
from bus_containers_provider import create_app, start, stop, metrics
from bus_containers_provider.usage import EventsUsage

url, secret, token, directory = sys.argv[1:]
app = create_app({"BUS_CONTAINERS_JWT_SECRET": secret, "BUS_CONTAINERS_BACKEND": "events",
                  "BUS_EVENTS_API_URL": url, "BUS_API_TOKEN": token, "BUS_CONTAINERS_USAGE_BACKEND": "events",
                  "BUS_CONTAINERS_METRICS_ADDR": "127.0.0.1:9", "BUS_EVENTS_LISTENER_RETRY": "1"})
assert metrics.enabled()
start(app)
bus = app.extensions["bus_containers"].bus
assert bus.wait_connected(10)

def scrape():
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)
    return generate_latest(registry).decode()

def event(n, kind):
    return {"event_type": kind, "event_id": f"r{n}:{kind}", "account_id": "a",
             "occurred_at": "2026-01-01T00:00:00Z", "data": {"run_id": f"r{n}"}}

usage = EventsUsage(bus, timeout=1.0, retry_delay=0.01, senders=1, flush_timeout=0.5)
usage.start()
usage.record_later(event(1, "container_run_finished"))  # refused every time: lost after its attempts
deadline = time.monotonic() + 30
while 'reason="attempts"' not in scrape():
    assert time.monotonic() < deadline, scrape()
    time.sleep(0.05)
print("AFTER-LOST", scrape().replace(chr(10), "|"))
for n in range(2, 5):
    usage.record_later(event(n, "container_run_failed"))  # never answered: the sender waits on the first
# One record goes to the sender, which waits on its reply; the other two stay queued behind it.
# All three are pending: one being sent counts until it is recorded.
while "bus_containers_usage_records_pending 3.0" not in scrape():
    assert time.monotonic() < deadline, scrape()
    time.sleep(0.05)
print("QUEUED", scrape().replace(chr(10), "|"))
usage.stop()  # the held records: no answer within the flush timeout
print("STOPPED", scrape().replace(chr(10), "|"))
stop(app)
"""
    directory = tmp_path / "multiproc"
    directory.mkdir()
    result = subprocess.run([sys.executable, "-c", probe, events_server.url, SECRET, EVENTS_TOKEN, str(directory)],
                            env=provider_env(PROMETHEUS_MULTIPROC_DIR=str(directory)), cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = {line.split(" ", 1)[0]: line.split(" ", 1)[1].split("|") for line in result.stdout.splitlines()}
    sample = lambda stage, name: next(float(s.rsplit(" ", 1)[1]) for s in lines[stage] if s.startswith(name + " "))
    assert sample("AFTER-LOST", 'bus_containers_usage_records_lost_total{reason="attempts"}') == 1
    assert sample("AFTER-LOST", "bus_containers_usage_records_pending") == 0
    assert sample("QUEUED", 'bus_containers_usage_records_lost_total{reason="attempts"}') == 1
    assert sample("STOPPED", 'bus_containers_usage_records_lost_total{reason="shutdown"}') >= 2
    assert sample("STOPPED", "bus_containers_usage_records_pending") == 0


def test_run_control_rejections_and_replays_are_counted(events_server, responder):
    # One worker with room for two runs at once, and one run per account.
    with metrics_provider("--workers", "1", "--threads", "4", "--max-runs-per-account", "1",
                          env=events_process_env(events_server)) as provider:
        held = {"profile": "sleep:3", "args": ["echo", "held"], "timeout_seconds": 10}
        first_key = {"Idempotency-Key": "key-1"}
        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
            first = pool.submit(fresh_post, provider.url, "acct-a", held, first_key)
            events_server.wait_published("bus.containers.run.request", count=1, timeout=10)
            over_limit = fresh_post(provider.url, "acct-a")
            other = pool.submit(fresh_post, provider.url, "acct-b", held)
            events_server.wait_published("bus.containers.run.request", count=2, timeout=10)
            no_capacity = fresh_post(provider.url, "acct-c")
            retry_in_flight = fresh_post(provider.url, "acct-a", held, first_key)
            other_body = fresh_post(provider.url, "acct-a", {"profile": "codex"}, first_key)
            during = scrape(provider.metrics_url)
            answers = [first.result(timeout=30), other.result(timeout=30)]
        replay = fresh_post(provider.url, "acct-a", held, first_key)
        after = scrape(provider.metrics_url)

    assert [a.status_code for a in answers] == [200, 200]
    assert (over_limit.status_code, no_capacity.status_code) == (429, 503)
    assert (retry_in_flight.status_code, other_body.status_code) == (409, 422)
    assert replay.status_code == 200 and replay.headers["Idempotent-Replayed"] == "true"
    rejections = lambda samples, reason: value(samples, "bus_containers_run_rejections_total", reason=reason)
    assert value(during, "bus_containers_runs_in_flight") == 2
    for reason in ("too_many_runs", "capacity", "conflict", "idempotency_key_reused"):
        assert rejections(during, reason) == 1, reason
    assert value(during, "bus_containers_idempotent_replays_total") == 0
    assert value(after, "bus_containers_idempotent_replays_total") == 1
    # A replay is not a second run.
    assert value(after, "bus_containers_runs_total", status="succeeded") == 2
    assert value(after, "bus_containers_runs_in_flight") == 0


def test_gunicorn_conf_serves_the_same_metrics():
    port = free_port()
    environment = provider_env(BUS_CONTAINERS_METRICS_ADDR=f"127.0.0.1:{port}", BUS_CONTAINERS_WORKERS="2")
    with gunicorn_conf(env=environment) as process:
        with_metrics(process)
        assert process.metrics_url == f"http://127.0.0.1:{port}"
        statuses = [fresh_post(process.url).status_code for _ in range(5)]
        samples = scrape(process.metrics_url)
    assert statuses == [200] * 5
    assert requests_total(samples, RUNS, "POST", 200) == 5


def alive(pid: int) -> bool:
    with contextlib.suppress(FileNotFoundError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


def test_the_listener_exits_when_the_master_is_killed():
    with metrics_provider() as provider:
        assert alive(provider.exporter_pid)
        os.kill(provider.pid, signal.SIGKILL)
        wait_for(lambda: not alive(provider.exporter_pid), timeout=20, what="the listener to exit")
    # No on_exit ran: the directory is left behind, as after any SIGKILL (PrivateTmp clears it under systemd).
    shutil.rmtree(provider.metrics_dir, ignore_errors=True)


def test_a_busy_metrics_address_fails_the_start():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        result = subprocess.run([str(SCRIPT), "--addr", f"127.0.0.1:{free_port()}", "--metrics-addr", busy],
                                env=provider_env(), cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert f"cannot listen for metrics on {busy}" in result.stderr
    assert not LISTENER_LINE.search(result.stderr)


def test_without_metrics_addr_nothing_is_exported_or_imported():
    with console_script() as provider:
        assert requests.get(f"{provider.url}/metrics", timeout=10).status_code == 404
        assert fresh_post(provider.url).status_code == 200
        output = provider.log()
    assert not LISTENER_LINE.search(output) and "PROMETHEUS" not in output
    # Off means prometheus_client is never even imported, in the master or a worker.
    probe = ("import sys; from bus_containers_provider import create_app; "
             "from bus_containers_provider.serving import gunicorn_options; "
             "from bus_containers_provider import metrics; "
             "app = create_app({'BUS_CONTAINERS_JWT_SECRET': sys.argv[1]}); gunicorn_options(app.extensions"
             "['bus_containers'].settings); metrics.run_started(); metrics.run_ended(status='succeeded'); "
             "metrics.listener_state('x', True); metrics.usage_lost(); "
             "print('prometheus_client' in sys.modules, metrics.enabled())")
    result = subprocess.run([sys.executable, "-c", probe, SECRET], env=provider_env(), cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.stdout.split() == ["False", "False"], result.stderr


def test_metrics_addr_outside_the_provider_gunicorn_records_nothing(caplog):
    from bus_containers_provider import create_app, metrics, start, stop

    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    app = create_app(env(BUS_CONTAINERS_METRICS_ADDR="127.0.0.1:9"))
    start(app)  # where a worker switches metrics on
    stop(app)
    assert "no metrics are recorded" in caplog.text
    assert not metrics.enabled()
    response = app.test_client().get("/metrics")
    assert response.status_code == 404 and response.get_json()["error"]["type"] == "not_found"


@pytest.mark.parametrize("rule, label", [
    ("/api/v1/containers/runs/<run_id>", "/api/v1/containers/runs/{run_id}"),
    ("/api/v1/containers/runs", "/api/v1/containers/runs"),
    ("/a/<int:n>/b/<path:rest>", "/a/{n}/b/{rest}"),
])
def test_route_label_is_the_contract_pattern(rule, label):
    from bus_containers_provider.metrics import route_label

    assert route_label(rule) == label


def _scrape_app(directory):
    from bus_containers_provider.metrics.listener import metrics_app

    answer = {}
    body = b"".join(metrics_app(str(directory))({"PATH_INFO": "/metrics", "REQUEST_METHOD": "GET",
                                                  "QUERY_STRING": ""},
                                                 lambda status, headers: answer.update(status=status,
                                                                                       headers=dict(headers))))
    return answer["status"], answer["headers"], body


def test_a_scrape_while_a_worker_creates_its_file_is_answered(tmp_path):
    """A starting worker's file is empty for a moment: the scrape is the others' sums, not a 500."""
    probe = ("from prometheus_client import Counter; "
             "Counter('bus_containers_probe_total', 'probe').inc(3)")
    subprocess.run([sys.executable, "-c", probe], env=dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path)),
                   check=True, timeout=30)
    (tmp_path / "counter_99999.db").write_bytes(b"")  # created, header not yet written
    status, _, body = _scrape_app(tmp_path)
    assert status == "200 OK"
    assert "bus_containers_probe_total 3.0" in body.decode()


def test_an_unreadable_file_is_a_json_503_with_retry_after(tmp_path):
    # A header that promises more bytes than the file holds: the files changed under the scrape.
    (tmp_path / "counter_99999.db").write_bytes((1000).to_bytes(4, "little") + b"\0" * 12)
    status, headers, body = _scrape_app(tmp_path)
    assert status.startswith("503")
    assert headers["Content-Type"] == "application/json" and headers["Retry-After"] == "1"
    assert json.loads(body)["error"]["type"] == "unavailable"


def test_with_preload_each_worker_records():
    """--preload builds the app in the master before it makes the directory: workers switch on after fork."""
    env = provider_env(BUS_CONTAINERS_WORKERS="2", BUS_CONTAINERS_METRICS_ADDR=f"127.0.0.1:{free_port()}")
    with gunicorn_conf("--preload", env=env) as process:
        provider = with_metrics(process)
        sent, _ = until_both_workers_served(provider)
        assert requests_total(scrape(provider.metrics_url), RUNS, "POST", 200) == sent
