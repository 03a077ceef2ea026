"""gunicorn wiring shared by the console script and gunicorn.conf.py."""
import json
import logging
import math
import resource

from gunicorn import util
from gunicorn.app.base import BaseApplication
from gunicorn.workers.gthread import ThreadWorker

from . import create_app, start, stop
from .errors import HTTP_TYPES

log = logging.getLogger("bus_containers_provider")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s"},
        "line": {"format": "%(message)s"},  # request lines are JSON already
    },
    "handlers": {
        "stderr": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"},
        "requests": {"class": "bus_containers_provider.logs.LineHandler", "formatter": "line",
                     "stream": "ext://sys.stdout"},
    },
    # gunicorn merges this over its defaults key by key, so its own loggers are restated.
    "root": {"level": "INFO", "handlers": ["stderr"]},
    "loggers": {
        "gunicorn.error": {"level": "INFO", "handlers": ["stderr"], "propagate": False, "qualname": "gunicorn.error"},
        "gunicorn.access": {"level": "INFO", "handlers": [], "propagate": False, "qualname": "gunicorn.access"},
        "bus_containers_provider": {"level": "INFO", "handlers": ["stderr"], "propagate": False},
        "bus_containers_provider.requests": {"level": "INFO", "handlers": ["requests"], "propagate": False},
    },
}


def write_json_error(sock, status_int, reason, mesg):
    """gunicorn's own answers (request line too long, headers too large, bad framing), as the JSON envelope."""
    error_type = "unavailable" if status_int >= 500 else HTTP_TYPES.get(status_int, "bad_request")
    body = json.dumps({"error": {"type": error_type, "message": reason}}).encode()
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1")
    util.write_nonblock(sock, head + body)


class JsonErrorWorker(ThreadWorker):
    """The gthread worker (one thread per request), whose own error pages are JSON, not HTML.

    gunicorn answers malformed requests before the app sees them, through
    util.write_error; this worker process points that at the JSON envelope and
    keeps gunicorn's own choice of status for each case.
    """

    def init_process(self):
        util.write_error = write_json_error
        super().init_process()


def post_worker_init(worker):
    # Threads do not survive fork: each worker starts its own listeners here.
    start(worker.wsgi)


def worker_exit(server, worker):
    # Runs after gunicorn has let in-flight requests finish, so their replies still arrive.
    app = getattr(worker, "wsgi", None)
    if app is not None and "bus_containers" in getattr(app, "extensions", {}):
        stop(app)


def gunicorn_options(settings) -> dict:
    """gunicorn settings that follow from the provider's Settings."""

    def on_starting(server):
        log.info("configuration: %s", settings.redacted())
        _raise_fd_limit(_fds_per_worker(settings))
        if settings.backend == "static" and settings.effective_workers > 1:
            log.warning("the static backend keeps runs per process; with %d workers callers "
                        "see a different run list per worker", settings.effective_workers)

    return {
        "bind": settings.addr,
        "workers": settings.effective_workers,
        "threads": settings.threads,
        # gthread stops accepting at worker_connections (default 1000), counting idle
        # keep-alive connections too: below the threads, threads idle while callers wait.
        "worker_connections": _worker_connections(settings),
        # One listening socket per worker: the kernel spreads connections evenly
        # over them, where a shared socket goes to whichever worker wakes first.
        "reuse_port": True,
        # gthread: one thread per request. Its heartbeat does not depend on request
        # threads, so the worker timeout never kills a long foreground run.
        "worker_class": f"{__name__}.JsonErrorWorker",
        # Room for an 8 KiB token in Authorization, so the app (not gunicorn) refuses larger ones.
        "limit_request_field_size": 16 * 1024,
        # SIGTERM: stop accepting, let in-flight runs finish for this long, then exit.
        "graceful_timeout": math.ceil(settings.shutdown_grace),
        "logconfig_dict": LOGGING,
        # No access line: the app writes its own request line (logs.py).
        "logger_class": "bus_containers_provider.logs.ServerLogger",
        # gunicorn's runtime control socket: one fixed path per user, so several
        # instances clobber each other, and an admin interface we do not use.
        "control_socket_disable": True,
        "on_starting": on_starting,
        "post_worker_init": post_worker_init,
        "worker_exit": worker_exit,
    }


def _worker_connections(settings) -> int:
    return max(1000, 2 * settings.threads)


def _fds_per_worker(settings) -> int:
    # A caller's connection each, an Events publish connection per thread, and room for the rest.
    return _worker_connections(settings) + settings.threads + 256


def _raise_fd_limit(needed: int) -> None:
    """Lift the soft descriptor limit toward what a worker may need; the hard limit is the operator's."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < needed:
            log.warning("open files are limited to %d; each worker may need %d (raise LimitNOFILE)",
                        target, needed)


class ProviderApplication(BaseApplication):
    """gunicorn in-process; each worker builds its app after fork."""

    def __init__(self, settings):
        self.settings = settings
        super().__init__()

    def load_config(self):
        for key, value in gunicorn_options(self.settings).items():
            self.cfg.set(key, value)

    def load(self):
        return create_app(self.settings)
