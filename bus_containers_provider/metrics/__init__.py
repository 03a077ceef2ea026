"""Prometheus metrics (CONTRACT §8): the calls the rest of the code makes, and the per-request series.

Each call is a cheap no-op until `init_app` has switched metrics on in this
process, so instrumented code never checks a setting. The series themselves
live in `series` (imported only once on, after the gunicorn master has set
PROMETHEUS_MULTIPROC_DIR); the /metrics listener lives in `exporter`.
"""
import functools
import logging
import os
import re
import time
from typing import Optional

from flask import g, request


log = logging.getLogger(__name__)

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
# Label values come from these fixed sets; anything else is counted under the fallback.
RUN_STATUSES = frozenset({"succeeded", "failed", "timed_out", "cancelled", "error"})
REJECTIONS = frozenset({"too_many_runs", "conflict", "idempotency_key_reused", "capacity"})
BILLING_ACTIONS = frozenset({"setup_billing", "upgrade_plan"})
USAGE_LOSSES = frozenset({"attempts", "backlog_full", "shutdown"})
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"  # the route label of a request no route matched: never the raw path

_CONVERTER = re.compile(r"<(?:[^<>:]+:)?([^<>]+)>")

# prometheus_client keeps its series per process, not per app; so does this
# switch: the series module once on in this process, None while off.
_series = None


def enabled() -> bool:
    return _series is not None


def init_app(app, settings) -> None:
    """With --metrics-addr, count every request of `app`; the calls below switch on with switch_on()."""
    if settings.metrics_addr is None:
        return
    # The duration is timed from the request log's own start (logs._begin, installed first).
    app.after_request(_finish)
    if os.environ.get(MULTIPROC_DIR):
        switch_on(settings)


def switch_on(settings) -> None:
    """Record from here on, once the master has made the multiprocess directory.

    Called again in each worker after fork (start()): with --preload the app is
    built in the master before its on_starting hook makes the directory.
    """
    global _series
    if settings.metrics_addr is None or _series is not None:
        return
    if not os.environ.get(MULTIPROC_DIR):
        # Only the provider's gunicorn hooks create the directory and the listener that reads it.
        log.warning("--metrics-addr is set but this process was not started by the provider's gunicorn "
                    "configuration; no metrics are recorded")
        return
    from . import series

    _series = series


@functools.lru_cache(maxsize=256)
def route_label(rule: str) -> str:
    """Flask's `/runs/<run_id>` as the contract writes it, `/runs/{run_id}`."""
    return _CONVERTER.sub(r"{\1}", rule)


def _finish(response):
    s = _series
    if s is not None:
        req = request._get_current_object()
        rule = req.url_rule
        route = route_label(rule.rule) if rule is not None else UNMATCHED
        method = req.method if req.method in METHODS else "other"
        now = time.perf_counter()
        elapsed = now - getattr(g._get_current_object(), "started", now)
        requests_total, duration = _request_series(route, method, response.status_code)
        requests_total.inc()
        duration.observe(elapsed)
    return response


@functools.lru_cache(maxsize=1024)
def _request_series(route: str, method: str, status: int):
    """The two children a request updates; labels() takes its metric's lock, so once per label set."""
    return (_series.HTTP_REQUESTS.labels(route, method, str(status)),
            _series.HTTP_DURATION.labels(route, method))


def _pick(value, allowed, fallback: str) -> str:
    return value if value in allowed else fallback


# --- runs and their controls (CONTRACT §7) ------------------------------------

def run_started(detached: bool = False) -> None:
    """A run was handed over (or adopted) and this process waits for its answer."""
    if (s := _series) is not None:
        s.RUNS_IN_FLIGHT.inc()
        if detached:
            s.RUNS_DETACHED_IN_FLIGHT.inc()


def run_ended(detached: bool = False, status: Optional[str] = None, adopted: bool = False) -> None:
    """A run started with run_started() no longer waits here; `status`, its §7 outcome, when this
    process completed it (None: another process did)."""
    if (s := _series) is not None:
        s.RUNS_IN_FLIGHT.dec()
        if detached:
            s.RUNS_DETACHED_IN_FLIGHT.dec()
        if status is not None:
            _run_series(_pick(status, RUN_STATUSES, "error")).inc()
            if adopted:
                s.RUNS_ADOPTED.inc()


@functools.lru_cache(maxsize=None)  # one per §7 status
def _run_series(status: str):
    return _series.RUNS.labels(status)


def rejected(kind: str) -> None:
    """A run refused by the controls: too_many_runs, conflict, idempotency_key_reused or capacity."""
    if (s := _series) is not None:
        s.RUN_REJECTIONS.labels(_pick(kind, REJECTIONS, "other")).inc()


def replayed() -> None:
    """A run answered again from its Idempotency-Key record."""
    if (s := _series) is not None:
        s.IDEMPOTENT_REPLAYS.inc()


# --- the Events API -----------------------------------------------------------

def reply_timed_out(event: str) -> None:
    """A request on `event` (the reply name) got no reply within its wait."""
    if (s := _series) is not None:
        s.EVENTS_REPLY_TIMEOUTS.labels(event).inc()


def reply_seconds(event: str, seconds: float) -> None:
    if (s := _series) is not None:
        s.EVENTS_REPLY.labels(event).observe(seconds)


def listener_state(event: str, connected: bool) -> None:
    if (s := _series) is not None:
        s.LISTENER_CONNECTED.labels(event).set(1 if connected else 0)


def listener_reconnected(event: str) -> None:
    """The reply stream for `event` failed and its listener tries again."""
    if (s := _series) is not None:
        s.LISTENER_RECONNECTS.labels(event).inc()


# --- usage and billing --------------------------------------------------------

def usage_pending(count: int) -> None:
    """This worker's usage records waiting to be sent."""
    if (s := _series) is not None:
        s.USAGE_PENDING.set(count)


def usage_lost(reason: str = "attempts", count: int = 1) -> None:
    if (s := _series) is not None and count:
        s.USAGE_LOST.labels(_pick(reason, USAGE_LOSSES, "attempts")).inc(count)


def billing_denied(action) -> None:
    """A run refused with 402; `action` is the guidance it carried (setup_billing, upgrade_plan)."""
    if (s := _series) is not None:
        s.BILLING_DENIALS.labels(_pick(action, BILLING_ACTIONS, "other")).inc()
