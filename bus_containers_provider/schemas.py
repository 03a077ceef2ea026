"""Every request and reply shape, declared once and instantiated once per shape."""
import re

from marshmallow import (
    EXCLUDE, RAISE, Schema, ValidationError, fields, post_load, pre_load, validate, validates, validates_schema,
)

from . import fastpath
from .fastpath import MAX_COMMAND_BYTES, MAX_COMMAND_ITEMS
from .fastpath import owner_from_identity as _owner_from_identity

# CONTRACT §7: env and stdin limits (the command's cap, of our own, is in fastpath.py).
MAX_ENV_ENTRIES = 64
MAX_ENV_BYTES = 32 * 1024
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Run ids the provider and integrations hand out: letters, digits and ._:- (the request id's
# alphabet), up to 128 characters, not starting with a dot.
RUN_ID = re.compile(r"[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,127}")
# The outcomes a run result may carry (§7 "Outcome status").
RUN_STATUSES = ("succeeded", "failed", "timed_out", "cancelled", "error")


class StrictBoolean(fields.Boolean):
    """JSON true or false, nothing else: truthy={True} alone lets 1 through, since 1 == True."""

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, bool):
            raise self.make_error("invalid")
        return value


class Plain:
    """A schema whose instance may carry fastpath readers: `fast_load`, `fast_dump` (None: not that case)."""

    def load(self, data, *, many=None, partial=None, unknown=None):
        fast = getattr(self, "fast_load", None)
        if fast is not None and many is None and partial is None and unknown is None:
            loaded = fast(data)
            if loaded is not None:
                return loaded
        return super().load(data, many=many, partial=partial, unknown=unknown)

    def dump(self, obj, *, many=None):
        fast = getattr(self, "fast_dump", None)
        if fast is not None and many is None:
            dumped = fast(obj)
            if dumped is not None:
                return dumped
        return super().dump(obj, many=many)


class Reply(Schema):
    """What integrations send: fields we do not know are ignored, not refused."""

    class Meta:
        unknown = EXCLUDE


class OwnedReply(Reply):
    """A reply naming its owner; integrations may call the owner owner_identity_id."""

    @pre_load
    def _owner_synonym(self, data, **kwargs):
        return _owner_from_identity(data)


class EnvField(fields.Dict):
    """An object of strings; its errors never name an entry, since names and values may be secrets."""

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in value.items()):
            raise ValidationError("env must be an object of strings")
        return dict(value)


class WholeNumber(fields.Integer):
    """A JSON integer, read as JSON Schema reads one: 148 and 148.0 are the same number.

    The OpenAPI document publishes `type: integer`, which 148.0 satisfies, so a client or fuzzer
    generated from it may send that; 1.5, true, "148" and infinities stay refused.
    """

    def __init__(self, **kwargs):
        super().__init__(strict=True, **kwargs)

    def _validated(self, value):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return super()._validated(value)


class RunRequestSchema(Plain, Schema):
    """Body of POST /runs: a profile and/or an image, and the command to run."""

    class Meta:
        unknown = RAISE

    profile = fields.String(validate=validate.Length(min=1, max=256))
    image = fields.String(validate=validate.Length(min=1, max=1024))
    command = fields.List(fields.String(), validate=validate.Length(max=MAX_COMMAND_ITEMS))
    args = fields.List(fields.String(), validate=validate.Length(max=MAX_COMMAND_ITEMS))
    timeout_seconds = WholeNumber(validate=validate.Range(min=0))
    # env and stdin go to the backend and nowhere else: no error message ever quotes them.
    env = EnvField(keys=fields.String(), values=fields.String())
    stdin = fields.String(error_messages={"invalid": "stdin must be a string"})

    @validates("command", "args")
    def _command_size(self, value, data_key, **kwargs):
        if sum(len(item.encode("utf-8", "surrogatepass")) for item in value) > MAX_COMMAND_BYTES:
            raise ValidationError(f"at most {MAX_COMMAND_BYTES} bytes in all")

    @validates("env")
    def _env_limits(self, value, **kwargs):
        if len(value) > MAX_ENV_ENTRIES:
            raise ValidationError(f"at most {MAX_ENV_ENTRIES} entries")
        if not all(ENV_NAME.fullmatch(name) for name in value):
            raise ValidationError("names must match [A-Za-z_][A-Za-z0-9_]*")
        size = sum(len(k.encode("utf-8", "surrogatepass")) + len(v.encode("utf-8", "surrogatepass"))
                   for k, v in value.items())
        if size > MAX_ENV_BYTES:
            raise ValidationError(f"at most {MAX_ENV_BYTES} bytes of names and values in all")

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


class RunResultSchema(Plain, OwnedReply):
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
    # Optional in a reply (an integration's own outcome is used only when it is one of ours);
    # always present in an answer, set by results.settle().
    status = fields.String()
    timed_out = StrictBoolean(load_only=True)
    stdout_truncated = StrictBoolean(load_default=False)
    stderr_truncated = StrictBoolean(load_default=False)


class RunAnswerSchema(RunResultSchema):
    """A run result as answered to the caller: outcome and truncation flags always present (§7)."""

    class Meta(RunResultSchema.Meta):
        exclude = ("timed_out",)

    status = fields.String(required=True, validate=validate.OneOf(RUN_STATUSES))
    stdout_truncated = fields.Boolean(required=True)
    stderr_truncated = fields.Boolean(required=True)


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


run_request_schema = RunRequestSchema()
run_request_schema.fast_load = fastpath.run_request
run_result_schema = RunResultSchema()
run_result_schema.fast_load = fastpath.run_result
run_answer_schema = RunAnswerSchema()
run_answer_schema.fast_dump = fastpath.run_answer
status_item_schema = StatusItemSchema()
items_schema = ItemsSchema()
delete_result_schema = DeleteResultSchema()
runner_status_schema = RunnerStatusSchema()
runner_start_schema = RunnerStartSchema()
runner_delete_schema = RunnerDeleteSchema()
billing_reply_schema = BillingReplySchema()
ready_schema = ReadySchema()
error_schema = ErrorSchema()
