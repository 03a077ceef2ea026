"""Entitlement checks before a run: none, or bus.billing.entitlement.check over Events."""
from marshmallow import ValidationError

from . import metrics
from .bus import envelope_error
from .errors import BadGateway, BillingRequired
from .schemas import billing_reply_schema

REQUEST = "bus.billing.entitlement.check.request"
SCOPE = "container:run"
DEFAULT_COMMAND = "bus billing setup"
# Envelope error types that mean "not entitled", as opposed to a broken integration.
DENIALS = frozenset({"billing_required", "payment_required", "quota_exceeded", "not_entitled"})


class NoBilling:
    """--billing-backend none: every account may run."""

    reply_names = ()

    def check(self, account: str) -> None:
        return None


class EventsBilling(NoBilling):
    """--billing-backend events: ask bus-integration-billing; no answer means no run."""

    reply_names = ("bus.billing.entitlement.check.response",)

    def __init__(self, bus, timeout: float):
        self._bus = bus
        self._timeout = timeout

    def check(self, account: str) -> None:
        envelope = self._bus.request(REQUEST, {"account_id": account, "scope": SCOPE}, self._timeout)
        error = envelope_error(envelope)
        if error is not None and error[0] not in DENIALS:
            raise BadGateway("the billing integration failed the entitlement check")  # pragma: no mutate
        if error is not None:
            # A denial sent as an error envelope: its fields read like a denial reply's.
            fields = {k: v for k, v in envelope["error"].items() if k in ("action", "command", "message", "quota")}
            reply = dict(fields, allowed=False, reason=error[0])
        else:
            reply = envelope.get("payload")
        try:
            reply = billing_reply_schema.load(reply)
        except ValidationError:
            raise BadGateway("the entitlement reply is malformed") from None  # pragma: no mutate
        if not reply["allowed"]:
            raise denial(reply)


def denial(reply: dict) -> BillingRequired:
    """402 with guidance: what to do (action), how (command), and the quota when one ran out."""
    reason = reply.get("reason") or "billing_required"
    quota = reply.get("quota")
    action = reply.get("action") or ("upgrade_plan" if reason == "quota_exceeded" or quota else "setup_billing")
    command = reply.get("command") or DEFAULT_COMMAND
    metrics.billing_denied(action)
    if quota:
        message = ("the {meter} quota for {feature} is used up for this {window}: {used:g} of {limit:g}"  # pragma: no mutate
                   .format(**quota))  # pragma: no mutate
    else:
        message = reply.get("message") or "billing is not set up for container runs"  # pragma: no mutate
    return BillingRequired(f"{message}; run `{command}`", action=action, command=command,
                           details={"reason": reason, **({"quota": quota} if quota else {})})
