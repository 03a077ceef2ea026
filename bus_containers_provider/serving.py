"""gunicorn wiring shared by the console script and gunicorn.conf.py."""
import ipaddress
import logging
import math
import resource
from urllib.parse import urlsplit

from gunicorn.app.base import BaseApplication

from . import create_app, start, stop
from .board import Board
from .metrics import exporter
from .worker import ProviderWorker

log = logging.getLogger("bus_containers_provider")

# Beyond the shutdown grace, how long runs still waiting have to cancel themselves before gunicorn kills the worker.
DRAIN_SECONDS = 5

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


def plain_http_off_host(url) -> bool:
    """True for an http:// URL whose host is not this machine (loopback is the only safe plain-http peer)."""
    parsed = urlsplit(url or "")
    if parsed.scheme != "http":
        return False
    host = parsed.hostname or ""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True  # a name: it may resolve anywhere


def post_worker_init(worker):
    # Threads do not survive fork: each worker starts its own listeners here.
    start(worker.wsgi)


def worker_exit(server, worker):
    # Runs after gunicorn has let in-flight requests finish, so their replies still arrive.
    app = getattr(worker, "wsgi", None)
    if app is not None and "bus_containers" in getattr(app, "extensions", {}):
        stop(app)


def child_exit(server, worker):
    seat = getattr(worker, "seat", None)
    if seat is not None:
        seat.release()  # for its replacement; until now another full worker may have waited for it
    exporter.child_exit(server, worker)


def gunicorn_options(settings) -> dict:
    """gunicorn settings that follow from the provider's Settings."""

    def on_starting(server):
        exporter.on_starting(server, settings.metrics_addr)
        log.info("configuration: %s", settings.redacted())
        _raise_fd_limit(_fds_per_worker(settings))
        if settings.backend == "static" and settings.effective_workers > 1:
            log.warning("the static backend keeps runs per process; with %d workers callers "
                        "see a different run list per worker", settings.effective_workers)
        if settings.uses_events and plain_http_off_host(settings.events_url):
            log.warning("the Events API URL %s is plain http to another host: the provider's Events token and every "
                        "run's payload cross the network unencrypted; use https", settings.events_url)

    def pre_fork(server, worker):
        # The board lives on the arbiter, so workers forked after a reload share it with the ones still running.
        board = getattr(server, "provider_board", None)
        if board is None:
            board = server.provider_board = Board()
        worker.seat = board.seat(settings.run_capacity)

    return {
        "bind": settings.addr,
        "workers": settings.effective_workers,
        "threads": settings.threads,
        # gthread stops accepting at worker_connections (default 1000), counting idle
        # keep-alive connections too: below the threads, threads idle while callers wait.
        "worker_connections": _worker_connections(settings),
        # gthread: one thread per request. Its heartbeat does not depend on request
        # threads, so the worker timeout never kills a long foreground run. Request
        # heads are read in the worker's poller, never in a request thread (worker.py).
        "worker_class": f"{ProviderWorker.__module__}.{ProviderWorker.__name__}",
        # Room for an 8 KiB token in Authorization, so the app (not gunicorn) refuses larger ones.
        "limit_request_field_size": 16 * 1024,
        # SIGTERM: stop accepting, let in-flight runs finish for the grace, cancel the rest, then exit.
        "graceful_timeout": math.ceil(settings.shutdown_grace) + DRAIN_SECONDS,
        "logconfig_dict": LOGGING,
        # No access line: the app writes its own request line (logs.py).
        "logger_class": "bus_containers_provider.logs.ServerLogger",
        # gunicorn's runtime control socket: one fixed path per user, so several
        # instances clobber each other, and an admin interface we do not use.
        "control_socket_disable": True,
        "on_starting": on_starting,
        # Each worker's seat on the board that spreads a burst over the workers (board.py).
        "pre_fork": pre_fork,
        "post_worker_init": post_worker_init,
        "worker_exit": worker_exit,
        # The /metrics listener and the workers' metric files (no-ops without --metrics-addr);
        # child_exit hands the seat back too.
        "when_ready": exporter.when_ready,
        "child_exit": child_exit,
        "on_exit": exporter.on_exit,
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
