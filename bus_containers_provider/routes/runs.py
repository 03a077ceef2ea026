"""Public container API: status, run creation, run reads and deletion (ai.hg.fi/api)."""
import json

from flask import Blueprint, current_app, g, jsonify, request
from marshmallow import ValidationError

from .. import metrics
from ..auth import requires
from ..backends import RunRequest
from ..controls import caller_gone, parse_key
from ..errors import BadRequest, RunNotFound, UnsupportedMediaType
from ..logs import new_id
from ..prefer import parse_prefer
from ..schemas import RUN_ID, delete_result_schema, items_schema, run_item_schema, run_items_schema, run_request_schema

bp = Blueprint("runs", __name__, url_prefix="/api/v1/containers")


def _run_id(run_id: str) -> str:
    # Anything else (NUL, "..", 10 KB) is no run of anyone's: not found, without asking a backend.
    if not RUN_ID.fullmatch(run_id):
        raise RunNotFound()
    return run_id


def _provider():
    return current_app.extensions["bus_containers"]


def _json_object() -> dict:
    if request.mimetype != "application/json":
        raise UnsupportedMediaType()
    try:
        # json.loads refuses trailing data after the document, as the contract asks.
        body = json.loads(request.get_data(cache=False))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise BadRequest("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def _validation_message(errors: dict) -> str:
    parts = []
    for name, problems in sorted(errors.items(), key=lambda kv: str(kv[0])):
        text = "; ".join(str(p) for p in problems) if isinstance(problems, list) else str(problems)
        parts.append(text if name == "_schema" else f"{name}: {text}")
    return "; ".join(parts)


@bp.get("/status")
@requires("container:read")
def status():
    """Container status and the runs visible to the caller."""
    return items_schema.dump({"items": _provider().backend.status(g.principal.account)})


@bp.post("/runs")
@requires("container:run")
def create_run():
    """Run one container: its result, or with Prefer: respond-async its item at once (a retried key: the first answer)."""
    key = parse_key(request.headers.get("Idempotency-Key"))
    try:
        body = run_request_schema.load(_json_object())
    except ValidationError as exc:
        raise BadRequest(_validation_message(exc.messages)) from None
    provider = _provider()
    limit = provider.settings.max_run_timeout
    if body.get("timeout_seconds", 0) > limit:
        raise BadRequest(f"timeout_seconds must be at most {int(limit)}")
    run = RunRequest(run_id=f"run_{new_id()}", owner_account_id=g.principal.account, **body)
    g.run_id = run.run_id  # for the request log line
    answer = provider.run(run, key, caller_gone(request.environ), parse_prefer(request.headers.getlist("Prefer")))
    response = jsonify(answer.body)
    response.status_code = answer.status
    response.headers.update(answer.headers)
    if answer.replayed:
        metrics.replayed()
        g.run_id = answer.body.get("run_id") or (answer.body.get("error", {}).get("details") or {}).get("run_id")
        response.headers["Idempotent-Replayed"] = "true"
    return response


@bp.get("/runs")
@requires("container:read")
def list_runs():
    """The caller's runs."""
    return run_items_schema.dump({"items": _provider().list_runs(g.principal.account)})


@bp.get("/runs/<run_id>")
@requires("container:read")
def read_run(run_id):
    """One of the caller's runs (with Prefer: wait=N, once it finishes); another account's run id is not found."""
    wait = parse_prefer(request.headers.getlist("Prefer")).wait
    shown, headers = _provider().read_run(g.principal.account, _run_id(run_id), wait)
    return run_item_schema.dump(shown), 200, headers


@bp.delete("/runs/<run_id>")
@requires("container:delete")
def delete_run(run_id):
    """Delete or cancel one of the caller's runs."""
    return delete_result_schema.dump(_provider().delete_run(g.principal.account, _run_id(run_id)))
