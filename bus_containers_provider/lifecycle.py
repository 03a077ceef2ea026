"""Whether this worker is draining: set by the gunicorn worker on SIGTERM, read by /readyz.

Per app (app.extensions), never a module global: each worker process has its own app.
"""
DRAINING = "bus_containers_draining"


def mark_draining(app) -> None:
    app.extensions[DRAINING] = True


def draining(app) -> bool:
    return app.extensions.get(DRAINING, False)
