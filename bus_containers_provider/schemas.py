"""Every request and reply shape, declared once and instantiated once per shape."""
from marshmallow import (
    EXCLUDE, RAISE, Schema, ValidationError, fields, post_load, pre_load, validate, validates_schema,
)



class StrictBoolean(fields.Boolean):
    """JSON true or false, nothing else: truthy={True} alone lets 1 through, since 1 == True."""

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, bool):
            raise self.make_error("invalid")
        return value


class Reply(Schema):
    """What integrations send: fields we do not know are ignored, not refused."""

    class Meta:
        unknown = EXCLUDE


class OwnedReply(Reply):
    """A reply naming its owner; integrations may call the owner owner_identity_id."""

    @pre_load
    def _owner_synonym(self, data, **kwargs):
        return _owner_from_identity(data)


class RunRequestSchema(Schema):
    """Body of POST /runs: a profile and/or an image, and the command to run."""

    class Meta:
        unknown = RAISE

    profile = fields.String(validate=validate.Length(min=1, max=256))
    image = fields.String(validate=validate.Length(min=1, max=1024))
    command = fields.List(fields.String())
    args = fields.List(fields.String())
    timeout_seconds = fields.Integer(strict=True, validate=validate.Range(min=0))

    @validates_schema
    def _needs_target(self, data, **kwargs):
        if "profile" not in data and "image" not in data:
            raise ValidationError("profile or image is required", "_schema")
        if "profile" not in data and not _command(data):
            raise ValidationError("image runs need a command (there is no portable default)", "command")

    @post_load
    def _command_from_args(self, data, **kwargs):
        data["command"] = _command(data)
        data.pop("args", None)
        return data


class RuntimeSchema(Reply):
    state = fields.String(required=True)
    provider = fields.String(required=True)


class RunResultSchema(OwnedReply):
    """A finished run, as answered to the caller and as read from a run reply."""

    run_id = fields.String(required=True)
    owner_account_id = fields.String(required=True)
    runner_name = fields.String(required=True)
    image = fields.String(required=True)
    args = fields.List(fields.String(), required=True)
    exit_code = fields.Integer(strict=True, required=True)
    stdout = fields.String(required=True)
    stderr = fields.String(required=True)
    duration_ms = fields.Integer(strict=True, required=True, validate=validate.Range(min=0))
    runtime = fields.Nested(RuntimeSchema, required=True)


class StatusItemSchema(OwnedReply):
    id = fields.String(required=True)
    state = fields.String(required=True)
    owner_account_id = fields.String()
    details = fields.Dict(keys=fields.String())


class ItemsSchema(Reply):
    """Status and run listings: {"items": [...]}."""

    items = fields.List(fields.Nested(StatusItemSchema), required=True)


class DeleteResultSchema(OwnedReply):
    deleted = StrictBoolean(required=True)
    run_id = fields.String(required=True)
    owner_account_id = fields.String(required=True)


class RunnerStateSchema(Reply):
    state = fields.String(required=True)
    provider = fields.String(required=True)
    details = fields.Dict(keys=fields.String(), load_default=dict)


class RunnerStatusSchema(Reply):
    status = fields.Nested(RunnerStateSchema, required=True)


class RunnerStartSchema(Reply):
    accepted = StrictBoolean(required=True)
    action = fields.String(load_default="start")


class RunnerDeleteSchema(Reply):
    deleted = StrictBoolean(required=True)


class QuotaSchema(Reply):
    feature = fields.String(required=True)
    meter = fields.String(required=True)
    window = fields.String(required=True)
    used = fields.Float(required=True)
    limit = fields.Float(required=True)


class BillingReplySchema(Reply):
    """bus.billing.entitlement.check.response payload."""

    allowed = StrictBoolean(required=True)
    reason = fields.String()
    action = fields.String()
    command = fields.String()
    message = fields.String()
    quota = fields.Nested(QuotaSchema)


class ReadySchema(Schema):
    ok = fields.Boolean(required=True)


class ErrorBodySchema(Schema):
    type = fields.String(required=True)
    message = fields.String(required=True)
    action = fields.String()
    command = fields.String()
    details = fields.Dict(keys=fields.String())


class ErrorSchema(Schema):
    """The one error envelope: {"error": {"type", "message", "action"?, "command"?}}."""

    error = fields.Nested(ErrorBodySchema, required=True)


def _command(data) -> list:
    # args is the older name of command, used when command is absent.
    return data["command"] if "command" in data else data.get("args") or []


def _owner_from_identity(data):
    # Integrations may name the owner owner_identity_id; it means the same account.
    if isinstance(data, dict) and "owner_account_id" not in data and "owner_identity_id" in data:
        data = dict(data, owner_account_id=data["owner_identity_id"])
    return data


run_request_schema = RunRequestSchema()
run_result_schema = RunResultSchema()
status_item_schema = StatusItemSchema()
items_schema = ItemsSchema()
delete_result_schema = DeleteResultSchema()
runner_status_schema = RunnerStatusSchema()
runner_start_schema = RunnerStartSchema()
runner_delete_schema = RunnerDeleteSchema()
billing_reply_schema = BillingReplySchema()
ready_schema = ReadySchema()
error_schema = ErrorSchema()
