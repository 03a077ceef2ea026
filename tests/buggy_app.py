"""A WSGI app whose backend has a bug: `gunicorn -c gunicorn.conf.py --pythonpath tests buggy_app:app`.

No input reaches the provider's last-resort error handler, so a test needs a bug to put there.
"""
import functools

from bus_containers_provider import create_app
from bus_containers_provider.backends.base import Backend


class Broken(Backend):
    """Every call raises something no handler expects, with text that must never be shown."""

    def _fail(self, *args, **kwargs):
        raise RuntimeError("a bug with a secret in its message: acct-a/token")

    status_items = start = delete = runner_status = runner_start = runner_delete = _fail


def buggy(app):
    provider = app.extensions["bus_containers"]
    provider.backend = provider.records.backend = Broken()
    return app


@functools.lru_cache(maxsize=None)
def _app():
    return buggy(create_app())  # configured from the environment, like wsgi.py


def __getattr__(name):
    # `app` is built when gunicorn asks for it, not when a test imports Broken.
    if name == "app":
        return _app()
    raise AttributeError(name)
