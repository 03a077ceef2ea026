"""Every series the provider exports (CONTRACT §8), defined once with fixed label names.

Importing this module imports prometheus_client, which picks its storage at
import: the gunicorn master sets PROMETHEUS_MULTIPROC_DIR first, so each
worker writes its own file there and the /metrics listener adds them up.
Only the functions in the package's __init__ import it, and only when
metrics are on. No label is ever given an account, run id, token, env or stdin.
"""
from prometheus_client import Counter, Gauge, Histogram

# Foreground runs last from milliseconds to an hour: buckets span both.
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)

HTTP_REQUESTS = Counter(
    "bus_containers_http_requests_total", "HTTP requests answered, by route pattern, method and status.",
    ("route", "method", "status"))
HTTP_DURATION = Histogram(
    "bus_containers_http_request_duration_seconds", "Time to answer an HTTP request, by route pattern and method.",
    ("route", "method"), buckets=SECONDS)

# Gauges in "live" modes: a dead worker's files go at child_exit, so its values leave the sum.
RUNS_IN_FLIGHT = Gauge(
    "bus_containers_runs_in_flight", "Runs started and not yet answered, over every worker.",
    multiprocess_mode="livesum")
RUNS = Counter("bus_containers_runs_total", "Runs answered, by outcome status (CONTRACT §7).", ("status",))
# §9: records running with no request thread waiting, and records completed by a process that adopted them.
RUNS_DETACHED_IN_FLIGHT = Gauge(
    "bus_containers_runs_detached_in_flight", "Run records running without a foreground caller, over every worker.",
    multiprocess_mode="livesum")
RUNS_ADOPTED = Counter(
    "bus_containers_runs_adopted_total", "Run records completed by a process that did not publish them.")
RUN_REJECTIONS = Counter(
    "bus_containers_run_rejections_total",
    "Runs refused by the run controls: too_many_runs (429), conflict (409), "
    "idempotency_key_reused (422), capacity (503).", ("reason",))
IDEMPOTENT_REPLAYS = Counter(
    "bus_containers_idempotent_replays_total", "Runs answered again from an Idempotency-Key record.")

EVENTS_REPLY = Histogram(
    "bus_containers_events_reply_seconds", "Time from publishing a request to its reply, by reply event name.",
    ("event",), buckets=SECONDS)
EVENTS_REPLY_TIMEOUTS = Counter(
    "bus_containers_events_reply_timeouts_total", "Requests whose reply did not come in time, by reply event name.",
    ("event",))
# The lowest over the live workers: 0 as soon as any worker's stream for the name is down.
LISTENER_CONNECTED = Gauge(
    "bus_containers_events_listener_connected", "1 while every worker's reply stream for the event is open.",
    ("event",), multiprocess_mode="livemin")
LISTENER_RECONNECTS = Counter(
    "bus_containers_events_listener_reconnects_total",
    "Attempts to reopen a reply stream after it failed, by reply event name.", ("event",))

USAGE_PENDING = Gauge(
    "bus_containers_usage_records_pending", "Usage records waiting to be sent or retried, over every worker.",
    multiprocess_mode="livesum")
USAGE_LOST = Counter(
    "bus_containers_usage_records_lost_total",
    "Usage records given up: attempts used up, backlog full, or still queued at shutdown.", ("reason",))
BILLING_DENIALS = Counter(
    "bus_containers_billing_denials_total", "Runs refused by the entitlement check (402), by action.", ("action",))
