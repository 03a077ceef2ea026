"""One structured log line per request, and the request id that ties it to the caller."""
import json
import logging
import re
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone

from flask import g, has_request_context, request

log = logging.getLogger("bus_containers_provider.requests")

# An incoming id is echoed back and logged, so only plain, short ids are honoured.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _begin():
    incoming = request.headers.get("X-Request-Id", "")
    g.request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
    g.started = time.perf_counter()
    g.backend_seconds = 0.0


@contextmanager
def backend_timer():
    """Counts time spent on Events round trips toward this request's log line."""
    started = time.perf_counter()
    try:
        yield
    finally:
        if has_request_context() and "backend_seconds" in g:
            g.backend_seconds += time.perf_counter() - started


def _finish(response):
    request_id = g.get("request_id") or uuid.uuid4().hex
    response.headers["X-Request-Id"] = request_id
    if log.isEnabledFor(logging.INFO):
        principal = g.get("principal")
        line = {
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "request_id": request_id,
            "method": request.method,
            "route": request.url_rule.rule if request.url_rule else None,
            "status": response.status_code,
            "duration_ms": round((time.perf_counter() - g.get("started", time.perf_counter())) * 1000, 3),
            "backend_ms": round(g.get("backend_seconds", 0.0) * 1000, 3),
            "account": principal.account if principal else None,
            "run_id": g.get("run_id") or (request.view_args or {}).get("run_id"),
        }
        # Never the Authorization header, a token or a body: only the fields above.
        log.info(json.dumps(line, separators=(",", ":")))
    return response


def init_app(app):
    app.before_request(_begin)
    app.after_request(_finish)
