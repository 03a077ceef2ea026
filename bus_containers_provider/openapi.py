"""The OpenAPI 3 document of the HTTP surface, generated from the marshmallow schemas.

Every body shape comes from `schemas.py` through apispec's MarshmallowPlugin; this
module only adds what marshmallow cannot say (paths, status codes, headers, security,
the cross-field rules of a run request, the env limits and the configured
`timeout_seconds` maximum). The rules are in the schema itself (anyOf, required,
maxItems, maxProperties, propertyNames), not only in prose, so generated clients and
fuzzers accept exactly what the provider accepts. OpenAPI 3.1, because a 3.0 schema
cannot constrain the names of env's properties.

The document is built once per app, by `init_app(app)`. Importing this module builds nothing.
"""
from importlib import metadata

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Blueprint, current_app, jsonify

from . import schemas
from .auth import requires
from .config import INTERNAL_AUDIENCE, PUBLIC_AUDIENCE, Settings

OPENAPI_PATH = "/api/v1/containers/openapi.json"
OPENAPI_VERSION = "3.1.0"
SECURITY_SCHEME = "bearerAuth"
EXTENSION = "bus_containers_openapi"
DEFAULT_MAX_RUN_TIMEOUT = int(Settings.max_run_timeout)

bp = Blueprint("openapi", __name__)

# Component name -> the one schema instance of schemas.py that declares the shape.
COMPONENTS = {
    "RunRequest": schemas.run_request_schema,
    "RunResult": schemas.run_answer_schema,
    "StatusItem": schemas.status_item_schema,
    "Items": schemas.items_schema,
    "RunItem": schemas.run_item_schema,
    "RunItems": schemas.run_items_schema,
    "DeleteResult": schemas.delete_result_schema,
    "RunnerStatus": schemas.runner_status_schema,
    "RunnerStart": schemas.runner_start_schema,
    "RunnerDelete": schemas.runner_delete_schema,
    "Ready": schemas.ready_schema,
    "Error": schemas.error_schema,
}

RUN_REQUEST_DESCRIPTION = (
    "Body of a run (400 `bad_request` otherwise): `profile` or `image` is required; without `profile`, a "
    "non-empty `command` or `args` is required (there is no portable default command); `args` is the older "
    "name of `command` and is used only when `command` is absent; `timeout_seconds` is at most the configured "
    "maximum run timeout (`--max-run-timeout`, default 3600). `command` (and `args`) hold at most "
    f"{schemas.MAX_COMMAND_ITEMS} strings and {schemas.MAX_COMMAND_BYTES // 1024} KiB in all; `env` at most "
    f"{schemas.MAX_ENV_ENTRIES} entries and {schemas.MAX_ENV_BYTES // 1024} KiB of names and values in all; "
    "`stdin` fits in the 1 MiB body. `env` and `stdin` reach the container and appear nowhere else. "
    "Unknown fields are rejected, including any attempt to name the owner account (`owner_account_id`, "
    "`account_id`): the owner is always the token's `sub`."
)

# The cross-field rules of RunRequestSchema._needs_target, as JSON Schema: a profile, or an image with
# a non-empty command, or an image with non-empty args and no command (args is used only without it).
RUN_REQUEST_RULES = [
    {"required": ["profile"]},
    {"required": ["image", "command"], "properties": {"command": {"minItems": 1}}},
    {"required": ["image", "args"], "not": {"required": ["command"]}, "properties": {"args": {"minItems": 1}}},
]
ENV_SCHEMA = {
    "type": "object",
    "maxProperties": schemas.MAX_ENV_ENTRIES,
    # A JSON Schema pattern matches anywhere, so it is anchored; the lookahead keeps a
    # trailing newline out where "$" alone would let it in (Python's re, unlike ECMA-262).
    "propertyNames": {"pattern": f"^{schemas.ENV_NAME.pattern}$(?![\\s\\S])"},
    "additionalProperties": {"type": "string"},
}
# CONTRACT §7: 1-255 of `!`..`~`, or a Structured Field string ("...", escapes \" and \\) that unquotes to that.
IDEMPOTENCY_KEY_PATTERN = (
    r'^(?:[!-~]|[!#-~][!-~]{0,254}|"[!-~]{0,253}[!#-~]|"(?:[!#-\[\]-~]|\\["\\]){1,255}")$'
)
IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "Makes the run safe to retry: the same key with the same body answers the first run's "
                   "answer again (`Idempotent-Replayed: true`), never a second run; with a different body, 422.",
    "schema": {"type": "string", "pattern": IDEMPOTENCY_KEY_PATTERN},
}
RETRY_AFTER = {
    "description": "Whole seconds to wait before retrying.",
    "required": True,
    "schema": {"type": "integer", "minimum": 0},
}

RUN_REQUEST_EXAMPLE = {"image": "alpine:3.20", "command": ["sh", "-c", "printf OK"], "timeout_seconds": 60}

# status -> (error types, description); every error body is the Error envelope.
ERRORS = {
    400: "`bad_request`: bad JSON, trailing data, non-object body, wrong field types, a missing profile/image, "
         "an image without a command, a negative or too large `timeout_seconds`, unknown fields.",
    401: "`invalid_auth`: missing, malformed, badly signed, expired or wrong-audience bearer token.",
    402: "`billing_required`: billing denies the run (`action` and `command` say what to do; a quota denial "
         "carries the quota in `details`).",
    403: "`forbidden`: the token lacks the route's scope, or the backend answered with another account's result.",
    404: "`not_found`: no run with this id for the caller (another account's run is not found either).",
    405: "`method_not_allowed`: known route, wrong method.",
    409: "`conflict`: a run with this `Idempotency-Key` is still in flight and this request cannot wait for it.",
    413: "`payload_too_large`: body over 1 MiB.",
    415: "`unsupported_media_type`: the body is not sent as `application/json`.",
    422: "`idempotency_key_reused`: this `Idempotency-Key` was used with a different body.",
    429: "`too_many_runs`: the account already has its maximum of runs in flight (`details`: `limit`, "
         "`in_flight`).",
    502: "`bad_gateway`: the container integration answered with a malformed reply.",
    503: "`unavailable`: the Events API is unreachable, a reply timed out, a required reply listener is down, "
         "this process's run capacity is full, the state store is down, or the provider is shutting down.",
}

BACKEND_ERRORS = (401, 403, 405, 502, 503)
PUBLIC_SCOPE = "Bearer JWT with audience `{audience}` and scope `{scope}`."
INTERNAL_SCOPE = "Internal: bearer JWT with audience `{audience}` and scope `container:admin` " \
                 "(a token for `{public}` never opens it, whatever its scopes)."


# status -> the name of its reusable response in components.responses.
RESPONSE_NAMES = {
    400: "BadRequest", 401: "Unauthorized", 402: "BillingRequired", 403: "Forbidden", 404: "NotFound",
    405: "MethodNotAllowed", 409: "Conflict", 413: "PayloadTooLarge", 415: "UnsupportedMediaType",
    422: "IdempotencyKeyReused", 429: "TooManyRuns", 502: "BadGateway", 503: "Unavailable",
}
# Refusals a client should retry later say when (CONTRACT §3, §7).
RETRIED = (409, 429, 503)


def _error(status: int) -> dict:
    response = {"description": ERRORS[status], "content": {"application/json": {"schema": "Error"}}}
    if status == 401:
        response["headers"] = {"WWW-Authenticate": {
            "description": "The authentication scheme to use: `Bearer`.",
            "required": True,
            "schema": {"type": "string"},
        }}
    elif status == 405:
        response["headers"] = {"Allow": {
            "description": "The methods the route accepts.",
            "required": True,
            "schema": {"type": "string"},
        }}
    elif status in RETRIED:
        response["headers"] = {"Retry-After": RETRY_AFTER}
    return response


def _ok(description: str, component: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": component}}}


def _operation(operation_id, summary, description, tag, responses, errors, *, secured=True, **extra):
    operation = {
        "operationId": operation_id,
        "summary": summary,
        "description": description,
        "tags": [tag],
        "security": [{SECURITY_SCHEME: []}] if secured else [],
        "responses": {**{str(status): body for status, body in responses.items()},
                      **{str(status): RESPONSE_NAMES[status] for status in sorted(errors)}},
    }
    operation.update(extra)
    return operation


def _public(scope: str) -> str:
    return PUBLIC_SCOPE.format(audience=PUBLIC_AUDIENCE, scope=scope)


def _internal() -> str:
    return INTERNAL_SCOPE.format(audience=INTERNAL_AUDIENCE, public=PUBLIC_AUDIENCE)


RUN_ID = {
    "name": "run_id",
    "in": "path",
    "required": True,
    "description": "A run id as answered by POST /api/v1/containers/runs (`run_...`); "
                   "any other shape is no run of anyone's (404).",
    "schema": {"type": "string", "pattern": "^" + schemas.RUN_ID.pattern + "$"},
}


PREFER_RUN = {
    "name": "Prefer",
    "in": "header",
    "required": False,
    "description": "RFC 7240. `respond-async`: answer 202 with the run's item as soon as the run request is "
                   "published, and collect the result from `Location`; `respond-async, wait=N`: wait up to N "
                   "seconds (at most `--max-wait`) for the foreground answer first. Unknown or malformed "
                   "preferences are ignored.",
    "schema": {"type": "string"},
    "example": "respond-async, wait=10",
}
PREFER_READ = dict(PREFER_RUN, description="RFC 7240. `wait=N`: while the run is running, hold the request up to "
                                           "N seconds (at most `--max-wait`, and only with run capacity to spare) "
                                           "and answer as soon as it finishes.", example="wait=30")
REPLAYED = {"description": "`true` when this is the stored answer of an earlier request with the same "
                           "`Idempotency-Key`.", "schema": {"type": "string", "enum": ["true"]}}
PREFERENCE_APPLIED = {"description": "The preferences applied (RFC 7240): `respond-async`, and `wait=N` with the "
                                     "wait actually granted.", "schema": {"type": "string"}}
POLL_AFTER = {"description": "Seconds before the run is worth reading again.",
              "schema": {"type": "integer", "minimum": 1}}

# The run id answered by a run opens its read and its deletion.
RUN_LINKS = {
    "GetRun": {"operationId": "getRun", "parameters": {"run_id": "$response.body#/run_id"},
               "description": "Read the run just created."},
    "DeleteRun": {"operationId": "deleteRun", "parameters": {"run_id": "$response.body#/run_id"},
                  "description": "Delete the run just created."},
}


def build_spec(max_run_timeout: float = DEFAULT_MAX_RUN_TIMEOUT) -> dict:
    """The OpenAPI document as a dict, for a provider whose largest `timeout_seconds` is `max_run_timeout`."""
    spec = APISpec(
        title="Bus containers API provider",
        version=_version(),
        openapi_version=OPENAPI_VERSION,
        plugins=[MarshmallowPlugin()],
        info={"description": "Account-isolated container runs over the Bus Events API. "
                             "Every body is JSON; every error is the Error envelope."},
    )
    spec.components.security_scheme(SECURITY_SCHEME, {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": (
            f"HS256 JWT with `sub`, `aud`, `exp`, `iat` and a space-separated `scope`. Public routes need "
            f"audience `{PUBLIC_AUDIENCE}`; internal routes need `{INTERNAL_AUDIENCE}` and `container:admin`. "
            "A token naming both audiences is refused everywhere."
        ),
    })
    for status, name in RESPONSE_NAMES.items():
        spec.components.response(name, _error(status))
    for name, schema in COMPONENTS.items():
        component = {"description": RUN_REQUEST_DESCRIPTION, "example": RUN_REQUEST_EXAMPLE} \
            if name == "RunRequest" else None
        spec.components.schema(name, component, schema=schema)
    _run_request_rules(spec.components.schemas["RunRequest"], max_run_timeout)

    read = _public("container:read")
    spec.path(path="/api/v1/containers/status", operations={"get": _operation(
        "getStatus", "Container status", f"Runner state and the caller's runs. {read}", "containers",
        {200: _ok("The caller's items; items without an owner carry only `id` and `state`.", "Items")},
        BACKEND_ERRORS)})
    spec.path(path="/api/v1/containers/runs", operations={
        "post": _operation(
            "createRun", "Run one container",
            f"Runs one container in the foreground and answers with its result; a non-zero `exit_code` is "
            f"still a 200. With `Prefer: respond-async` the run is detached: 202 once its request is published, "
            f"and its result is read from `Location`. {_public('container:run')}", "containers",
            {200: dict(_ok("The finished run (or, for a retried `Idempotency-Key`, the first run's answer).",
                           "RunResult"), links=RUN_LINKS, headers={"Idempotent-Replayed": REPLAYED,
                                                                   "Preference-Applied": PREFERENCE_APPLIED}),
             202: dict(_ok("The run is accepted and detached: its item, running (or, for a retried "
                           "`Idempotency-Key`, the first run's item as it is now).", "RunItem"),
                       headers={"Location": {"description": "Where to read the run.", "required": True,
                                             "schema": {"type": "string"}},
                                "Preference-Applied": PREFERENCE_APPLIED, "Retry-After": POLL_AFTER,
                                "Idempotent-Replayed": REPLAYED})},
            (400, 402, 409, 413, 415, 422, 429, *BACKEND_ERRORS),
            parameters=[IDEMPOTENCY_KEY, PREFER_RUN],
            requestBody={"required": True, "content": {"application/json": {"schema": "RunRequest"}}}),
        "get": _operation(
            "listRuns", "The caller's runs",
            f"The caller's run records (the 100 newest, newest first), then the backend's run items that have "
            f"none. {read}", "containers",
            {200: _ok("The caller's runs.", "RunItems")}, BACKEND_ERRORS),
    })
    spec.path(path="/api/v1/containers/runs/{run_id}", parameters=[RUN_ID], operations={
        "get": _operation(
            "getRun", "One run",
            f"One of the caller's runs, from its record when it has one (its `result` or `error` once "
            f"finished); another account's run id is not found. {read}",
            "containers", {200: dict(_ok("The run.", "RunItem"), headers={
                "Retry-After": dict(POLL_AFTER, description="On a running run: seconds before reading it again."),
                "Preference-Applied": PREFERENCE_APPLIED})}, (404, *BACKEND_ERRORS),
            parameters=[PREFER_READ]),
        "delete": _operation(
            "deleteRun", "Delete a run",
            f"Deletes one of the caller's runs; a running run with a record is cancelled (everyone waiting "
            f"gets its `cancelled` result) and then forgotten. {_public('container:delete')}", "containers",
            {200: _ok("The run is deleted.", "DeleteResult")}, (404, *BACKEND_ERRORS)),
    })
    internal = _internal()
    spec.path(path="/api/internal/containers/runner", operations={
        "get": _operation(
            "getRunner", "Runner status", f"The configured runner's operational state. {internal}", "runner",
            {200: _ok("The runner state.", "RunnerStatus")}, BACKEND_ERRORS),
        "post": _operation(
            "startRunner", "Start the runner", f"Starts and bootstraps the configured runner. {internal}",
            "runner", {202: _ok("The start is accepted.", "RunnerStart")}, BACKEND_ERRORS),
        "delete": _operation(
            "deleteRunner", "Delete the runner", f"Deletes the configured runner. {internal}", "runner",
            {200: _ok("The runner is deleted.", "RunnerDelete")}, BACKEND_ERRORS),
    })
    spec.path(path="/readyz", operations={"get": _operation(
        "readyz", "Readiness", "200 when every reply listener the enabled backends need is connected. No auth.",
        "health", {200: _ok("Ready.", "Ready")}, (405, 503), secured=False)})
    spec.path(path=OPENAPI_PATH, operations={"get": _operation(
        "getOpenapi", "This document", "The OpenAPI 3 document of this provider. Token audience `ai.hg.fi/api`, any scope.",
        "meta", {200: {"description": "The OpenAPI document.",
                       "content": {"application/json": {"schema": {"type": "object"}}}}},
        (401, 405))})
    return spec.to_dict()


def _run_request_rules(component: dict, max_run_timeout: float) -> None:
    """What RunRequestSchema checks beyond its field types, in the component itself."""
    properties = component["properties"]
    # The ceiling is configuration, not a field declaration: the marshmallow field says only min=0.
    properties["timeout_seconds"]["maximum"] = int(max_run_timeout)
    if "env" in properties:
        # apispec reads a Dict's Length as maxLength; env's limits are on its entries and names.
        properties["env"] = dict(ENV_SCHEMA)
    component["anyOf"] = RUN_REQUEST_RULES


def _version() -> str:
    try:
        return metadata.version("bus-api-provider-containers")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def _max_run_timeout(app) -> float:
    provider = app.extensions.get("bus_containers")
    return provider.settings.max_run_timeout if provider is not None else DEFAULT_MAX_RUN_TIMEOUT


def init_app(app) -> None:
    """Build the document once, after provider.init_app, so the configured limits are known."""
    app.extensions[EXTENSION] = build_spec(_max_run_timeout(app))
    app.register_blueprint(bp)


@bp.get(OPENAPI_PATH)
@requires(None)
def openapi_json():
    """The OpenAPI document: CONTRACT §2 exempts only /readyz, so it takes a token (any scope)."""
    return jsonify(current_app.extensions[EXTENSION])
