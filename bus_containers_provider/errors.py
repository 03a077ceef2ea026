"""The error tree, and the one handler that renders every error as the JSON envelope."""
import logging

from flask import jsonify
from werkzeug.exceptions import HTTPException

from .schemas import error_schema

log = logging.getLogger(__name__)


class ProviderError(Exception):
    """Base of every error the provider answers with; carries its HTTP shape."""

    status = 500
    type = "internal_error"
    default_message = "internal error"

    def __init__(self, message=None, *, action=None, command=None, details=None, headers=None):
        super().__init__(message or self.default_message)
        self.message = message or self.default_message
        self.action = action
        self.command = command
        self.details = details
        self.headers = headers or {}


class BadRequest(ProviderError):
    status, type, default_message = 400, "bad_request", "bad request"


class InvalidAuth(ProviderError):
    status, type, default_message = 401, "invalid_auth", "missing or invalid bearer token"

    def __init__(self, message=None, **kwargs):
        kwargs.setdefault("headers", {"WWW-Authenticate": "Bearer"})
        super().__init__(message, **kwargs)


class BillingRequired(ProviderError):
    status, type, default_message = 402, "billing_required", "billing setup is required to start runs"


class Forbidden(ProviderError):
    status, type, default_message = 403, "forbidden", "forbidden"


class NotFound(ProviderError):
    status, type, default_message = 404, "not_found", "not found"


class Conflict(ProviderError):
    """The same Idempotency-Key names a run still in flight that this request cannot wait for."""

    status, type, default_message = 409, "conflict", "a run with this Idempotency-Key is still in flight"


class IdempotencyKeyReused(ProviderError):
    status, type, default_message = 422, "idempotency_key_reused", \
        "this Idempotency-Key was used with a different request body"


class TooManyRuns(ProviderError):
    status, type, default_message = 429, "too_many_runs", "the account already has its maximum of runs in flight"


class UnsupportedMediaType(ProviderError):
    status, type, default_message = 415, "unsupported_media_type", "send the body as application/json"


class RunNotFound(NotFound):
    default_message = "run not found"


class OwnerMismatch(Forbidden):
    """A backend answered with a result that belongs to another account."""

    default_message = "the backend result belongs to another account"


class BadGateway(ProviderError):
    """The integration answered with something malformed; retrying will not help."""

    status, type, default_message = 502, "bad_gateway", "malformed reply from the container integration"


class Unavailable(ProviderError):
    """No answer in time or no way to ask; a retry later may succeed, after Retry-After."""

    status, type, default_message = 503, "unavailable", "the container backend is unavailable"
    retry_after = 1

    def __init__(self, message=None, *, retry_after=None, **kwargs):
        super().__init__(message, **kwargs)
        self.headers.setdefault("Retry-After", str(retry_after or self.retry_after))


class RunCancelled(Unavailable):
    """A run stopped waiting because its caller went away or the provider is shutting down."""

    default_message = "the run was cancelled"


class StateUnavailable(Unavailable):
    """The shared run-control store cannot be reached: no run without its controls."""

    default_message = "the run-control state store is unavailable"


# Errors raised below the app (Werkzeug routing, body size; gunicorn framing) keep their status.
HTTP_TYPES = {
    400: "bad_request",
    401: "invalid_auth",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def error_body(error_type, message, *, action=None, command=None, details=None) -> dict:
    """The contract's error envelope, from the schema that documents it."""
    body = {"type": error_type, "message": message}
    for key, value in (("action", action), ("command", command), ("details", details)):
        if value is not None:
            body[key] = value
    return error_schema.dump({"error": body})


def error_response(status, error_type, message, *, action=None, command=None, details=None, headers=None):
    response = jsonify(error_body(error_type, message, action=action, command=command, details=details))
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _provider_error(exc: ProviderError):
    return error_response(
        exc.status, exc.type, exc.message,
        action=exc.action, command=exc.command, details=exc.details, headers=exc.headers,
    )


def _http_error(exc: HTTPException):
    status = exc.code or 500
    headers = {k: v for k, v in exc.get_headers() if k.lower() in ("allow", "www-authenticate", "retry-after")}
    message = (exc.description or exc.name).strip()  # pragma: no mutate
    return error_response(status, HTTP_TYPES.get(status, exc.name.lower().replace(" ", "_")), message,
                          headers=headers)


def as_provider_error(exc: Exception) -> ProviderError:
    """The HTTP shape of any error: ours as is (the bus translates its own), anything else a bare 500."""
    return exc if isinstance(exc, ProviderError) else ProviderError()


def _unexpected(exc: Exception):
    # A bug, not an input: log it whole, answer with the envelope, never a page.
    log.exception("unhandled error")  # pragma: no mutate
    return error_response(500, "internal_error", "internal error")


def init_app(app):
    app.register_error_handler(ProviderError, _provider_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected)
