"""The OpenAPI document: generated from the marshmallow schemas, served without auth, and true of the live provider.

(a) The document, through the Flask test client: valid OpenAPI 3, every route and method,
    the contract's error responses and security, the RunResult and Error shapes of §3.
(b) schemathesis against the real provider (gunicorn, static backend): generated requests with
    valid tokens never get a 5xx, an undocumented status, a wrong content type, a missing
    documented header, or a body that does not match its documented schema.
"""
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate as validate_openapi
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance, response_headers_conformance, response_schema_conformance, status_code_conformance,
)

import processes
from bus_containers_provider import create_app, openapi, schemas
from conftest import ALL_PUBLIC_SCOPES, INTERNAL, assert_error, bearer, env
from fuzzing import examples

OPENAPI_PATH = "/api/v1/containers/openapi.json"
RUNS = "/api/v1/containers/runs"
RUN = "/api/v1/containers/runs/{run_id}"
RUNNER = "/api/internal/containers/runner"

# path -> method -> documented statuses (CONTRACT §2, §3).
BACKEND_ERRORS = {401, 403, 405, 502, 503}
EXPECTED = {
    "/api/v1/containers/status": {"get": {200} | BACKEND_ERRORS},
    RUNS: {"get": {200} | BACKEND_ERRORS, "post": {200, 202, 400, 402, 409, 413, 415, 422, 429} | BACKEND_ERRORS},
    RUN: {"get": {200, 404} | BACKEND_ERRORS, "delete": {200, 404} | BACKEND_ERRORS},
    RUNNER: {"get": {200} | BACKEND_ERRORS, "post": {202} | BACKEND_ERRORS, "delete": {200} | BACKEND_ERRORS},
    "/readyz": {"get": {200, 405, 503}},
    OPENAPI_PATH: {"get": {200, 401, 405}},
}
SCOPES = {
    ("/api/v1/containers/status", "get"): "container:read",
    (RUNS, "get"): "container:read",
    (RUNS, "post"): "container:run",
    (RUN, "get"): "container:read",
    (RUN, "delete"): "container:delete",
}
UNAUTHENTICATED = {("/readyz", "get")}


@pytest.fixture
def document(client):
    response = client.get(OPENAPI_PATH, headers=bearer())
    assert response.status_code == 200
    return response.get_json()


def operations(document):
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method in ("get", "post", "put", "patch", "delete", "head", "options", "trace"):
                yield path, method, operation


def resolve(document, node):
    while "$ref" in node:
        prefix, _, name = node["$ref"].rpartition("/")
        assert prefix in ("#/components/schemas", "#/components/responses"), node["$ref"]
        node = document["components"][prefix.rsplit("/", 1)[1]][name]
    return node


# --------------------------------------------------------------------------- (a) the document


def test_served_as_json_to_any_public_token(client):
    response = client.get(OPENAPI_PATH, headers=bearer(scope=""))
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert response.get_json()["openapi"].startswith("3.")


def test_valid_openapi_3(document):
    validate_openapi(document)
    loaded = schemathesis.openapi.from_dict(document)
    labels = {operation.ok().label for operation in loaded.get_all_operations()}
    assert len(labels) == sum(len(methods) for methods in EXPECTED.values())


def test_every_route_and_method(document):
    documented = {}
    for path, method, _ in operations(document):
        documented.setdefault(path, set()).add(method)
    assert documented == {path: set(methods) for path, methods in EXPECTED.items()}


def test_every_flask_route_is_documented(app, document):
    """Nothing the app routes is missing from the document, and nothing documented is unrouted."""
    routed = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = rule.rule.replace("<", "{").replace(">", "}")
        routed |= {(path, method.lower()) for method in rule.methods - {"HEAD", "OPTIONS"}}
    documented = {(path, method) for path, method, _ in operations(document)}
    assert routed == documented


def test_error_responses(document):
    for path, method, operation in operations(document):
        assert {int(status) for status in operation["responses"]} == EXPECTED[path][method], (method, path)
        for status, response in operation["responses"].items():
            response = resolve(document, response)
            schema = response["content"]["application/json"]["schema"]
            if int(status) >= 400:
                assert schema == {"$ref": "#/components/schemas/Error"}, (method, path, status)
            if status == "401":
                assert response["headers"]["WWW-Authenticate"]["required"] is True


def test_success_bodies_are_the_contract_schemas(document):
    expected = {
        ("/api/v1/containers/status", "get", "200"): "Items",
        (RUNS, "get", "200"): "RunItems",
        (RUNS, "post", "200"): "RunResult",
        (RUNS, "post", "202"): "RunItem",
        (RUN, "get", "200"): "RunItem",
        (RUN, "delete", "200"): "DeleteResult",
        (RUNNER, "get", "200"): "RunnerStatus",
        (RUNNER, "post", "202"): "RunnerStart",
        (RUNNER, "delete", "200"): "RunnerDelete",
        ("/readyz", "get", "200"): "Ready",
    }
    for (path, method, status), name in expected.items():
        content = document["paths"][path][method]["responses"][status]["content"]
        assert content["application/json"]["schema"] == {"$ref": f"#/components/schemas/{name}"}
    body = document["paths"][RUNS]["post"]["requestBody"]
    assert body["required"] is True
    assert body["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/RunRequest"}


def test_security(document):
    scheme = document["components"]["securitySchemes"]["bearerAuth"]
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer" and scheme["bearerFormat"] == "JWT"
    for path, method, operation in operations(document):
        if (path, method) in UNAUTHENTICATED:
            assert operation["security"] == []
            continue
        assert operation["security"] == [{"bearerAuth": []}]
        if path == RUNNER:
            assert INTERNAL in operation["description"] and "container:admin" in operation["description"]
        else:
            assert "ai.hg.fi/api" in operation["description"]
            # The document itself takes any scope.
            scope = f"`{SCOPES[path, method]}`" if path != OPENAPI_PATH else "any scope"
            assert scope in operation["description"], (method, path)


def test_component_shapes_follow_the_contract(document):
    components = document["components"]["schemas"]
    run_result = components["RunResult"]
    fields = {"run_id", "owner_account_id", "runner_name", "image", "args", "exit_code", "stdout", "stderr",
              "duration_ms", "runtime", "status", "stdout_truncated", "stderr_truncated"}
    assert set(run_result["properties"]) == fields
    assert run_result["properties"]["status"]["enum"] == ["succeeded", "failed", "timed_out", "cancelled", "error"]
    assert set(run_result["required"]) == fields
    # A run cancelled before any reply completed it (§9) has no runner, runtime or exit code.
    runtime, null = run_result["properties"]["runtime"]["anyOf"]
    assert resolve(document, runtime)["required"] == ["provider", "state"] and null == {"type": "null"}
    assert run_result["properties"]["exit_code"]["type"] == ["integer", "null"]
    assert run_result["properties"]["runner_name"]["type"] == ["string", "null"]
    run_item = components["RunItem"]
    assert {"id", "state", "owner_account_id", "details", "result", "error"} == set(run_item["properties"])
    assert resolve(document, run_item["properties"]["result"]) == run_result
    detached = document["paths"][RUNS]["post"]["responses"]["202"]["headers"]
    assert {"Location", "Preference-Applied", "Retry-After"} <= set(detached)

    error = components["Error"]
    assert error["required"] == ["error"]
    body = resolve(document, error["properties"]["error"])
    assert {"type", "message", "action", "command"} <= set(body["properties"])
    assert set(body["required"]) == {"type", "message"}

    run_request = components["RunRequest"]
    assert set(run_request["properties"]) == {"profile", "image", "command", "args", "timeout_seconds", "env", "stdin"}
    assert run_request["additionalProperties"] is False
    assert run_request["properties"]["timeout_seconds"] == {"type": "integer", "minimum": 0, "maximum": 3600}
    assert "profile" in run_request["description"] and "image" in run_request["description"]


def test_shapes_are_generated_from_the_marshmallow_schemas(document):
    """Each component lists exactly the fields its schemas.py schema declares."""
    for name, schema in openapi.COMPONENTS.items():
        component = document["components"]["schemas"][name]
        assert set(component["properties"]) == set(schema.fields), name
        required = {field.data_key or key for key, field in schema.fields.items() if field.required}
        assert set(component.get("required", ())) == required, name
    # The documented answer is the schema the run flow dumps answers with.
    assert openapi.COMPONENTS["RunResult"] is schemas.run_answer_schema


@pytest.mark.parametrize("app_env", [env(BUS_CONTAINERS_MAX_RUN_TIMEOUT="10m")])
def test_timeout_maximum_follows_configuration(document):
    assert document["components"]["schemas"]["RunRequest"]["properties"]["timeout_seconds"]["maximum"] == 600


@pytest.mark.parametrize("headers", [{}, bearer(audience=INTERNAL), {"Authorization": "Bearer x.y.z"}],
                         ids=["no token", "internal audience", "bad token"])
def test_the_document_takes_a_public_token(client, headers):
    """CONTRACT §2: every endpoint except /readyz needs a bearer token; this one, of the public audience."""
    assert_error(client.get(OPENAPI_PATH, headers=headers), 401, "invalid_auth")


def test_built_once_per_app(app, client):
    first = app.extensions[openapi.EXTENSION]
    assert client.get(OPENAPI_PATH, headers=bearer()).get_json() == first
    assert app.extensions[openapi.EXTENSION] is first
    assert create_app(env()).extensions[openapi.EXTENSION] is not first


def test_wrong_method_is_the_error_envelope(client):
    response = client.post(OPENAPI_PATH, headers=bearer())
    assert response.status_code == 405
    assert response.get_json()["error"]["type"] == "method_not_allowed"


# --------------------------------------------------------------------------- (b) schemathesis, live provider


@pytest.fixture(scope="module")
def live():
    """The installed console script under real gunicorn, static backend, on a free port."""
    with processes.console_script("--backend", "static") as process:
        yield process.url


def test_live_provider_serves_the_document(live):
    response = requests.get(live + OPENAPI_PATH, headers=bearer(), timeout=5)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    validate_openapi(response.json())


@pytest.fixture(scope="module")
def live_schema(live):
    return schemathesis.openapi.from_url(live + OPENAPI_PATH, headers=bearer(), timeout=5)


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]
PUBLIC_HEADERS = bearer(scope=ALL_PUBLIC_SCOPES)
INTERNAL_HEADERS = bearer(scope="container:admin", audience=INTERNAL)
LIVE = settings(max_examples=examples(25), deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                       HealthCheck.data_too_large])


# schemathesis' pytest integration (schemathesis.pytest.from_fixture) sets Node._nodeid, which pytest 9.2
# no longer has; its Python API (operation strategies under plain Hypothesis) works with any pytest.
@pytest.mark.parametrize("path,method", [(path, method) for path, methods in EXPECTED.items() for method in methods])
def test_live_provider_conforms(live, live_schema, path, method):
    operation = live_schema[path][method.upper()]
    headers = INTERNAL_HEADERS if path.startswith("/api/internal/") else PUBLIC_HEADERS
    cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE))

    @LIVE
    @given(case=cases)
    def conforms(case):
        case.call_and_validate(base_url=live, headers=headers, checks=CHECKS, timeout=10)

    conforms()


def test_live_run_lifecycle_follows_links(live, live_schema):
    """Stateful: runs created by POST /runs are read and deleted through the document's links."""

    class Lifecycle(live_schema.as_state_machine()):
        def get_call_kwargs(self, case):
            headers = INTERNAL_HEADERS if case.path.startswith("/api/internal/") else PUBLIC_HEADERS
            return {"base_url": live, "headers": headers, "timeout": 10}

        def validate_response(self, response, case, additional_checks=None, **kwargs):
            case.validate_response(response, checks=CHECKS, headers=kwargs.get("headers"), transport_kwargs=kwargs)

    Lifecycle.run(settings=settings(LIVE, max_examples=15, stateful_step_count=6))
