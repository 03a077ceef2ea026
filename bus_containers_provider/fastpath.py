"""A run's three shapes in their common form, read and written without marshmallow.

marshmallow spent ~190 µs of CPU on every events run: loading the request
(~65), loading the integration's reply (~85) and dumping the answer (~40).
For the plain case — the JSON types the schemas ask for, nothing unknown,
nothing the schemas would refuse — these functions build the very dict the
schema would, key order included, in a few µs. For anything else they answer
None and schemas.py asks marshmallow, so every refusal and its message stay
marshmallow's. tests/test_fastpath.py holds the two to the same answers.
"""
# CONTRACT §7 caps on the command (count and bytes) of our own; schemas.py declares them to marshmallow.
MAX_COMMAND_ITEMS = 1024
MAX_COMMAND_BYTES = 128 * 1024
# RunResultSchema's fields, in declaration order: (name, JSON type); None = a list of strings.
_RESULT = (("run_id", str), ("owner_account_id", str), ("runner_name", str), ("image", str), ("args", None),
           ("exit_code", int), ("stdout", str), ("stderr", str), ("duration_ms", int))
_RESULT_OPTIONAL = (("status", str), ("timed_out", bool))
_FLAGS = ("stdout_truncated", "stderr_truncated")
_REQUEST = frozenset({"profile", "image", "command", "args", "timeout_seconds"})


def owner_from_identity(data):
    """Integrations may name the owner owner_identity_id; it means the same account."""
    if isinstance(data, dict) and "owner_account_id" not in data and "owner_identity_id" in data:
        data = dict(data, owner_account_id=data["owner_identity_id"])
    return data


def _strings(value) -> bool:
    return type(value) is list and all(type(item) is str for item in value)


def _command_fits(value) -> bool:
    return (_strings(value) and len(value) <= MAX_COMMAND_ITEMS
            and sum(len(item.encode("utf-8", "surrogatepass")) for item in value) <= MAX_COMMAND_BYTES)


def run_request(data):
    """RunRequestSchema().load(data) for a body of profile/image/command/args/timeout_seconds, else None."""
    if type(data) is not dict or not data.keys() <= _REQUEST:
        return None
    loaded = {}
    for name, most in (("profile", 256), ("image", 1024)):
        if name in data:
            value = data[name]
            if type(value) is not str or not 1 <= len(value) <= most:
                return None
            loaded[name] = value
    for name in ("command", "args"):
        if name in data:
            if not _command_fits(data[name]):
                return None
            loaded[name] = list(data[name])
    if "timeout_seconds" in data:
        if type(data["timeout_seconds"]) is not int or data["timeout_seconds"] < 0:
            return None
        loaded["timeout_seconds"] = data["timeout_seconds"]
    command = loaded["command"] if "command" in loaded else loaded.get("args") or []
    if not ("profile" in loaded or ("image" in loaded and command)):
        return None  # marshmallow says which is missing
    loaded["command"] = command
    loaded.pop("args", None)
    return loaded


def run_result(data):
    """RunResultSchema().load(data) (unknown fields dropped) for a well-typed reply, else None."""
    data = owner_from_identity(data)
    if type(data) is not dict:
        return None
    loaded = {}
    for name, kind in _RESULT:
        value = data.get(name)
        if not (_strings(value) if kind is None else type(value) is kind):
            return None
        loaded[name] = list(value) if kind is None else value
    if loaded["duration_ms"] < 0:
        return None
    runtime = data.get("runtime")
    if type(runtime) is not dict or type(runtime.get("state")) is not str \
            or type(runtime.get("provider")) is not str:
        return None
    loaded["runtime"] = {"state": runtime["state"], "provider": runtime["provider"]}
    for name, kind in _RESULT_OPTIONAL:
        if name in data:
            if type(data[name]) is not kind:
                return None
            loaded[name] = data[name]
    for name in _FLAGS:
        value = data.get(name, False)
        if type(value) is not bool:
            return None
        loaded[name] = value
    return loaded


def run_answer(result):
    """RunAnswerSchema().dump(result) for a settled result of exact types, else None."""
    if type(result) is not dict:
        return None
    answer = {}
    for name, kind in _RESULT + (("runtime", dict), ("status", str)) + tuple((flag, bool) for flag in _FLAGS):
        value = result.get(name)
        if not (_strings(value) if kind is None else type(value) is kind):
            return None
        answer[name] = list(value) if kind is None else value
    runtime = answer["runtime"]
    if runtime.keys() != {"state", "provider"} or type(runtime["state"]) is not str \
            or type(runtime["provider"]) is not str:
        return None
    answer["runtime"] = {"state": runtime["state"], "provider": runtime["provider"]}
    return answer
