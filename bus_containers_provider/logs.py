"""One structured log line per request, and the request id that ties it to the caller."""
import json
import logging
import os
import re
import select
import time
from contextlib import contextmanager

from flask import g, has_request_context, request
from gunicorn.glogging import Logger as GunicornLogger

log = logging.getLogger("bus_containers_provider.requests")

# An incoming id is echoed back and logged, so only plain, short ids are honoured.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def new_id() -> str:
    """32 random hex digits: os.urandom without building a UUID object on every request."""
    return os.urandom(16).hex()


def _begin():
    # Each proxy lookup of `request` or `g` costs a context-variable walk: bind them once.
    req, ctx = request._get_current_object(), g._get_current_object()
    incoming = req.headers.get("X-Request-Id", "")
    ctx.request_id = incoming if _REQUEST_ID.match(incoming) else new_id()
    ctx.started = time.perf_counter()
    ctx.backend_seconds = 0.0


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
    ctx = g._get_current_object()
    request_id = getattr(ctx, "request_id", None) or new_id()
    response.headers["X-Request-Id"] = request_id
    if log.isEnabledFor(logging.INFO):
        req = request._get_current_object()
        now = time.perf_counter()
        principal = getattr(ctx, "principal", None)
        rule = req.url_rule
        line = {
            "time": _utc_now(),
            "request_id": request_id,
            "method": req.method,
            "route": rule.rule if rule else None,
            "status": response.status_code,
            "duration_ms": round((now - getattr(ctx, "started", now)) * 1000, 3),
            "backend_ms": round(getattr(ctx, "backend_seconds", 0.0) * 1000, 3),
            "account": principal.account if principal else None,
            "run_id": getattr(ctx, "run_id", None) or (req.view_args or {}).get("run_id"),
        }
        # Never the Authorization header, a token or a body: only the fields above.
        log.info(json.dumps(line, separators=(",", ":")))
    return response


def _utc_now() -> str:
    """RFC 3339 UTC with milliseconds, e.g. 2026-12-01T10:00:00.123Z."""
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + ".%03dZ" % (int(now * 1000) % 1000)


class LineHandler(logging.StreamHandler):
    """Request lines to a stream, each with one write(2) and no handler lock.

    logging's handler lock is held across the write, which gives up the GIL:
    with 32 request threads the others pile up on the lock, and every line
    costs a futex handoff. One write(2) of at most PIPE_BUF bytes is never
    interleaved with another on a pipe or an O_APPEND file, so the lock buys
    nothing for such lines; longer ones, and streams without a descriptor
    (a test's capture), take the locked path.
    """

    def handle(self, record):
        if not self.filter(record):
            return False
        try:
            fd = self.stream.fileno()
        except (AttributeError, OSError, ValueError):
            return super().handle(record)
        try:
            data = (self.format(record) + self.terminator).encode("utf-8", "backslashreplace")
        except Exception:
            self.handleError(record)
            return True
        if len(data) > select.PIPE_BUF:
            return super().handle(record)
        try:
            written = os.write(fd, data)
            if written < len(data):  # a full pipe or a signal cut it short: finish the line in order
                with self.lock:
                    _write_all(fd, data[written:])
        except OSError:
            self.handleError(record)
        return True


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


class ServerLogger(GunicornLogger):
    """gunicorn's logger without its access line: the app writes the request line itself.

    gunicorn builds the access atoms for every request whenever a logging
    config is given, even though our config sends them nowhere.
    """

    access_log_enabled = False


def init_app(app):
    app.before_request(_begin)
    app.after_request(_finish)
