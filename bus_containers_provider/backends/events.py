"""Backend that delegates every action to integration workers over the Bus Events API."""
from marshmallow import ValidationError

from ..bus import as_http, envelope_error, reply_name_for
from ..bus.client import EventsError
from ..errors import BadGateway, OwnerMismatch, RunNotFound
from ..schemas import (
    _owner_from_identity, delete_result_schema, items_schema, run_result_schema, runner_delete_schema, runner_start_schema,
    runner_status_schema,
)
from .base import Backend, OnReply, RunRequest, check_owner

STATUS = "bus.containers.status.request"
RUN = "bus.containers.run.request"
DELETE = "bus.containers.delete.request"
RUNNER_STATUS = "bus.containers.runner.status.request"
RUNNER_START = "bus.containers.runner.start.request"
RUNNER_DELETE = "bus.containers.runner.delete.request"
REQUESTS = (STATUS, RUN, DELETE, RUNNER_STATUS, RUNNER_START, RUNNER_DELETE)


def reply_payload(envelope: dict, schema, what: str) -> dict:
    """The validated payload of a reply envelope; an envelope error or bad shape is a 502."""
    error = envelope_error(envelope)
    if error is not None:
        kind, message = error
        if kind == "not_found":
            raise RunNotFound()
        raise BadGateway(f"the container integration failed the {what}" + (f": {message}" if message else ""))  # pragma: no mutate
    payload = envelope.get("payload")
    if not isinstance(payload, dict):
        raise BadGateway(f"the {what} reply has no payload object")  # pragma: no mutate
    try:
        return schema.load(payload)
    except ValidationError:
        raise BadGateway(f"the {what} reply is malformed") from None  # pragma: no mutate


def same_run(result: dict, run_id: str) -> dict:
    """A reply about another run is not an answer to this request."""
    if result["run_id"] != run_id:
        raise BadGateway("the container integration answered about another run")  # pragma: no mutate
    return result


class EventsBackend(Backend):
    reply_names = tuple(reply_name_for(name) for name in REQUESTS)

    def __init__(self, bus, settings):
        self._bus = bus
        self._settings = settings

    def _ask(self, request_name, payload, schema, what):
        envelope = self._bus.request(request_name, payload, self._settings.request_timeout)
        return reply_payload(envelope, schema, what)

    def status_items(self, account):
        envelope = self._bus.request(STATUS, {"owner_account_id": account}, self._settings.request_timeout)
        items = reply_payload(
            envelope, items_schema,
            "status",  # pragma: no mutate
        )["items"]
        # A reply addressed to another account is not ours to show, not even its unowned items.
        owner = _owner_from_identity(envelope["payload"]).get("owner_account_id")
        if owner is not None and owner != account:
            raise OwnerMismatch()
        return items

    def start(self, request: RunRequest, correlation_id: str, on_reply: OnReply):
        payload = {"run_id": request.run_id, "owner_account_id": request.owner_account_id,
                   "command": list(request.command), "max_output_bytes": self._settings.max_output_bytes}
        for key in ("profile", "image", "timeout_seconds", "env", "stdin"):
            if getattr(request, key) is not None:
                payload[key] = getattr(request, key)
        waiter = self._bus.expect(RUN, correlation_id, _translated(on_reply))
        try:
            self._bus.publish(RUN, correlation_id, payload)
        except BaseException:
            self._bus.forget(waiter)
            raise
        return waiter

    def adopt(self, correlation_id: str, on_reply: OnReply):
        waiter = self._bus.expect(RUN, correlation_id, _translated(on_reply))
        # Its reply may have come while no process waited for it: look in the stored history too.
        self._bus.recover(RUN, [correlation_id])
        return waiter

    def result(self, reply: dict, run_id: str) -> dict:
        return same_run(reply_payload(
            reply, run_result_schema,
            "run",  # pragma: no mutate
        ), run_id)

    def watch(self, handle, cancelled):
        handle.watch(cancelled)

    def unwatch(self, handle):
        handle.unwatch()

    def release(self, handle):
        if handle is not None:
            self._bus.forget(handle)

    def can_adopt(self) -> bool:
        return reply_name_for(RUN) not in self._bus.disconnected()

    def cancel(self, request: RunRequest):
        self._bus.notify(DELETE, {"run_id": request.run_id, "owner_account_id": request.owner_account_id})

    def delete(self, account, run_id):
        result = self._ask(
            DELETE, {"run_id": run_id, "owner_account_id": account}, delete_result_schema,
            "delete",  # pragma: no mutate
        )
        check_owner(result, account)
        same_run(result, run_id)
        if not result["deleted"]:
            raise BadGateway("the container integration did not delete the run")  # pragma: no mutate
        return result

    def runner_status(self):
        return self._ask(
            RUNNER_STATUS, {}, runner_status_schema,
            "runner status",  # pragma: no mutate
        )

    def runner_start(self):
        return self._ask(
            RUNNER_START, {}, runner_start_schema,
            "runner start",  # pragma: no mutate
        )

    def runner_delete(self):
        return self._ask(
            RUNNER_DELETE, {}, runner_delete_schema,
            "runner delete",  # pragma: no mutate
        )


def _translated(on_reply: OnReply) -> OnReply:
    """The Events client's errors (a stream down) reach the run as the answers they are."""
    def replied(reply, error):
        on_reply(reply, as_http(error) if isinstance(error, EventsError) else error)

    return replied
