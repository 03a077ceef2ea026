"""Internal runner lifecycle, for operator tooling only (ai.hg.fi/internal + container:admin)."""
from flask import Blueprint, current_app

from ..auth import requires
from ..config import INTERNAL_AUDIENCE
from ..schemas import runner_delete_schema, runner_start_schema, runner_status_schema

bp = Blueprint("runner", __name__, url_prefix="/api/internal/containers")
admin = requires("container:admin", audience=INTERNAL_AUDIENCE)


def _backend():
    return current_app.extensions["bus_containers"].backend


@bp.get("/runner")
@admin
def status():
    """The configured runner's operational state."""
    return runner_status_schema.dump(_backend().runner_status())


@bp.post("/runner")
@admin
def start():
    """Start and bootstrap the configured runner."""
    return runner_start_schema.dump(_backend().runner_start()), 202


@bp.delete("/runner")
@admin
def delete():
    """Delete the configured runner."""
    return runner_delete_schema.dump(_backend().runner_delete())
