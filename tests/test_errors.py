"""The error envelope (CONTRACT §3) for errors raised by the provider and by the layers below it."""
import pytest
from werkzeug import exceptions
from werkzeug.datastructures import WWWAuthenticate

from bus_containers_provider import create_app
from bus_containers_provider.bus import as_http
from bus_containers_provider.bus.client import EventsRejected, EventsUnavailable
from bus_containers_provider.errors import (
    BadGateway, ProviderError, RunCancelled, StateUnavailable, Unavailable, as_provider_error,
)
from conftest import assert_error, env


@pytest.mark.parametrize("error", [Unavailable, RunCancelled, StateUnavailable])
def test_an_unavailable_error_keeps_its_guidance_and_sets_retry_after(error):
    """§7 names the run of a 503 reply timeout in details; every 503 carries Retry-After (§3)."""
    raised = error("no reply", action="retry", command="bus containers runs get", details={"run_id": "run_1"},
                   headers={"X-Extra": "1"})
    assert (raised.status, raised.type, raised.message) == (503, "unavailable", "no reply")
    assert (raised.action, raised.command, raised.details) == ("retry", "bus containers runs get", {"run_id": "run_1"})
    assert raised.headers == {"X-Extra": "1", "Retry-After": "1"}
    assert error(retry_after=7).headers == {"Retry-After": "7"}


def test_the_bus_translates_the_events_client_errors_at_its_boundary():
    assert isinstance(as_http(EventsRejected(400, "bad")), BadGateway)
    assert as_http(EventsRejected(401, "refused")).status == 503
    assert as_http(EventsRejected(403, "refused")).status == 503
    down = as_http(EventsUnavailable("down"))
    assert down.status == 503 and down.message == "down" and down.headers["Retry-After"] == "1"
    mine = Unavailable("x")
    assert as_provider_error(mine) is mine
    assert type(as_provider_error(KeyError("x"))) is ProviderError


def test_the_error_tree_and_metrics_import_nothing_from_the_bus():
    """The layers point one way: the bus knows the errors, never the other way round."""
    import ast
    import pathlib

    package = pathlib.Path(__file__).resolve().parent.parent / "bus_containers_provider"
    for module in (package / "errors.py", package / "metrics" / "__init__.py", package / "metrics" / "series.py"):
        imported = {node.module for node in ast.walk(ast.parse(module.read_text()))
                    if isinstance(node, ast.ImportFrom) and node.module}
        assert not {name for name in imported if "bus" in name.split(".")}, (module.name, imported)


def app_raising(exc):
    app = create_app(env())

    def boom():
        raise exc

    app.add_url_rule("/boom", "boom", boom)
    return app.test_client()


def test_a_werkzeug_401_keeps_its_challenge():
    challenge = WWWAuthenticate("bearer", {"realm": "containers"})
    response = app_raising(exceptions.Unauthorized(www_authenticate=challenge)).get("/boom")
    assert_error(response, 401, "invalid_auth")
    assert response.headers["WWW-Authenticate"] == "Bearer realm=containers"


def test_a_werkzeug_503_keeps_its_retry_after():
    response = app_raising(exceptions.ServiceUnavailable(retry_after=5)).get("/boom")
    assert response.status_code == 503 and response.mimetype == "application/json"
    assert response.headers["Retry-After"] == "5"


@pytest.mark.parametrize("exc,status,error_type", [
    (exceptions.TooManyRequests(), 429, "too_many_requests"),
    (exceptions.ImATeapot(), 418, "i'm_a_teapot"),
    (exceptions.RequestedRangeNotSatisfiable(), 416, "requested_range_not_satisfiable"),
])
def test_a_status_without_a_contract_type_is_named_after_its_reason(exc, status, error_type):
    response = app_raising(exc).get("/boom")
    assert_error(response, status, error_type)
