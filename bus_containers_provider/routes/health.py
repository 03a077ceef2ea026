"""Readiness, for load balancers and orchestrators; no auth."""
from flask import Blueprint, current_app

from ..errors import Unavailable
from ..lifecycle import draining
from ..schemas import ready_schema

bp = Blueprint("health", __name__)


@bp.get("/readyz")
def readyz():
    """200 when every reply listener the enabled backends need is connected, and not shutting down."""
    if draining(current_app):
        # Connections already open still ask; a load balancer must stop sending here.
        raise Unavailable("the provider is shutting down")
    missing = current_app.extensions["bus_containers"].not_ready()
    if missing:
        raise Unavailable("reply listeners not connected: " + ", ".join(sorted(missing)))
    return ready_schema.dump({"ok": True})
