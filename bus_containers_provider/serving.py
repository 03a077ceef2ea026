"""gunicorn wiring shared by the console script and gunicorn.conf.py."""
import logging

from gunicorn.app.base import BaseApplication

from . import create_app, start, stop

log = logging.getLogger(__name__)


def post_worker_init(worker):
    # Threads do not survive fork: each worker starts its own listeners here.
    start(worker.wsgi)


def worker_exit(server, worker):
    app = getattr(worker, "wsgi", None)
    if app is not None and "bus_containers" in getattr(app, "extensions", {}):
        stop(app)


def gunicorn_options(settings) -> dict:
    """gunicorn settings that follow from the provider's Settings."""
    return {
        "bind": settings.addr,
        "workers": settings.effective_workers,
        "threads": settings.threads,
        "worker_class": "gthread",
        "post_worker_init": post_worker_init,
        "worker_exit": worker_exit,
    }


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
