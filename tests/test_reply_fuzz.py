"""Whatever an integration replies, the provider answers with its result or its own 4xx/5xx error, never a 500.

Three generators: any envelope at all; well-formed replies, which must be
read as results (so the success checks run on every example); and
well-formed replies with one required field broken, which must be a 502.
"""
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bus_containers_provider.backends import RunRequest
from bus_containers_provider.backends.events import EventsBackend
from bus_containers_provider.billing import EventsBilling
from bus_containers_provider.config import Settings
from bus_containers_provider.errors import BadGateway, BillingRequired, OwnerMismatch, ProviderError
from bus_containers_provider.usage import EventsUsage
from conftest import AnsweringBus

FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)
FIELDS = ["run_id", "owner_account_id", "owner_identity_id", "runner_name", "image", "args", "exit_code", "stdout",
          "stderr", "duration_ms", "runtime", "items", "deleted", "status", "accepted", "allowed", "reason",
          "command", "quota", "recorded", "id", "state", "details"]
payloads = st.one_of(json_values, st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=8))
errors = st.one_of(st.none(), json_values, st.fixed_dictionaries(
    {}, optional={"type": json_values | st.sampled_from(["not_found", "quota_exceeded", "billing_required"]),
                  "code": json_values, "message": json_values, "quota": json_values}))
envelopes = st.builds(lambda payload, error: {"payload": payload, **({"error": error} if error is not None else {})},
                      payloads, errors)

text = st.text(max_size=12)
extras = st.dictionaries(st.sampled_from(["extra", "note", "version"]), json_values, max_size=2)
owner_key = st.sampled_from(["owner_account_id", "owner_identity_id"])


def with_extras(base):
    """A well-formed payload plus fields we do not know (ignored, never refused)."""
    return st.builds(lambda payload, more: {**more, **payload}, base, extras)


status_items = st.lists(st.builds(
    lambda item, owner: {**item, **({"owner_account_id": owner} if owner else {})},
    st.fixed_dictionaries({"id": text, "state": text}, optional={"details": st.dictionaries(text, json_values)}),
    st.sampled_from([None, "acct-a", "acct-b"])), max_size=5)
run_results = st.builds(
    lambda fields, key: {**{k: v for k, v in fields.items() if k != "owner"}, key: "acct-a"},
    st.fixed_dictionaries({
        "run_id": st.just("run_1"), "owner": st.just("acct-a"), "runner_name": text, "image": text,
        "args": st.lists(text, max_size=3), "exit_code": st.integers(-255, 255), "stdout": text, "stderr": text,
        "duration_ms": st.integers(0, 10 ** 9),
        "runtime": st.fixed_dictionaries({"state": text, "provider": text})}),
    owner_key)
deletes = st.builds(lambda key: {"deleted": True, "run_id": "run_1", key: "acct-a"}, owner_key)
runner_states = st.fixed_dictionaries({"status": st.fixed_dictionaries(
    {"state": text, "provider": text}, optional={"details": st.dictionaries(text, json_values, max_size=3)})})
quotas = st.fixed_dictionaries({"feature": text, "meter": text, "window": text,
                                "used": st.integers(0, 10 ** 6), "limit": st.integers(0, 10 ** 6)})
billing_replies = st.one_of(
    st.just({"allowed": True}),
    st.fixed_dictionaries({"allowed": st.just(False)},
                          optional={"reason": text, "action": text, "command": text, "message": text,
                                    "quota": quotas}))
usage_replies = st.fixed_dictionaries({}, optional={"recorded": st.just(True), "event_id": text})

RUN = RunRequest(run_id="run_1", owner_account_id="acct-a", command=["true"], image="alpine")
ACTIONS = {
    "status": lambda backend, billing, usage: backend.status("acct-a"),
    "run": lambda backend, billing, usage: backend.result(backend._bus.request("bus.containers.run.request", {}, 1),
                                                           RUN.run_id),
    "delete": lambda backend, billing, usage: backend.delete("acct-a", "run_1"),
    "runner_status": lambda backend, billing, usage: backend.runner_status(),
    "runner_start": lambda backend, billing, usage: backend.runner_start(),
    "runner_delete": lambda backend, billing, usage: backend.runner_delete(),
    "billing": lambda backend, billing, usage: billing.check("acct-a"),
    "usage": lambda backend, billing, usage: usage.record({"event_id": "e", "data": {"run_id": "run_1"}}),
}
# The statuses each action may answer with; 500 is never one of them.
ALLOWED = {
    **{action: {403, 404, 502} for action in ("status", "run", "delete", "runner_status", "runner_start",
                                              "runner_delete")},
    "billing": {402, 502},
    "usage": {503},
}
WELL_FORMED = {
    "status": with_extras(st.fixed_dictionaries({"items": status_items})),
    "run": with_extras(run_results),
    "delete": with_extras(deletes),
    "runner_status": with_extras(runner_states),
    "runner_start": with_extras(st.fixed_dictionaries({"accepted": st.booleans()}, optional={"action": text})),
    "runner_delete": with_extras(st.fixed_dictionaries({"deleted": st.booleans()})),
    "billing": with_extras(billing_replies),
    "usage": usage_replies,
}
# Required fields and a wrong value for each: a reply with one of them is malformed.
REQUIRED = {
    "status": {"items": ["x", None, [5]]},
    "run": {"run_id": [5, None], "runner_name": [None, 1], "image": [None], "args": ["sh", [1]],
            "exit_code": ["0", 1.5, None, True], "stdout": [None, 1], "stderr": [None], "duration_ms": [-1, "1", None],
            "runtime": [None, "ready", {"state": "ready"}]},
    "delete": {"deleted": ["yes", 1, None, False], "run_id": [5, None, "run_2"]},
    "runner_status": {"status": ["ready", None, {"state": "ready"}]},
    "runner_start": {"accepted": ["yes", 1, None]},
    "runner_delete": {"deleted": ["yes", 0, None]},
    "billing": {"allowed": ["yes", 1, 0, None]},
}


def call(action, envelope):
    bus = AnsweringBus(envelope)
    backend = EventsBackend(bus, Settings(jwt_secret=b"x" * 32))
    return ACTIONS[action](backend, EventsBilling(bus, 1), EventsUsage(bus, 1))


def assert_provider_error(action, exc):
    assert exc.status in ALLOWED[action], (exc.status, exc.type, exc.message)
    assert exc.type != "internal_error" and isinstance(exc.message, str) and exc.message


@pytest.mark.parametrize("action", sorted(ACTIONS))
@FUZZ
@given(envelope=envelopes)
def test_any_reply_is_a_result_or_a_provider_error(action, envelope):
    try:
        result = call(action, envelope)
    except ProviderError as exc:
        assert_provider_error(action, exc)
        return
    json.dumps(result, allow_nan=False)  # whatever passes is valid JSON for the caller
    if action == "status":
        assert all(item.get("owner_account_id") in (None, "acct-a") for item in result)
    if action in ("run", "delete"):
        assert result["owner_account_id"] == "acct-a" and result["run_id"] == "run_1"


def expected_status(items):
    """§3 by hand: mine whole, unowned reduced to id and state, others' dropped."""
    return [item if item.get("owner_account_id") == "acct-a" else {"id": item["id"], "state": item["state"]}
            for item in items if item.get("owner_account_id") in (None, "acct-a")]


@pytest.mark.parametrize("action", sorted(WELL_FORMED))
@FUZZ
@given(data=st.data())
def test_a_well_formed_reply_is_read_as_its_result(action, data):
    payload = data.draw(WELL_FORMED[action])
    if action == "billing" and not payload["allowed"]:
        with pytest.raises(BillingRequired) as raised:
            call(action, {"payload": payload})
        denial = raised.value
        assert denial.status == 402 and denial.type == "billing_required"
        assert denial.action == (payload.get("action") or ("upgrade_plan" if payload.get("reason") == "quota_exceeded"
                                                           or payload.get("quota") else "setup_billing"))
        assert denial.command == (payload.get("command") or "bus billing setup")
        assert denial.command in denial.message
        return
    result = call(action, {"payload": payload})
    json.dumps(result, allow_nan=False)
    if action == "status":
        assert result == expected_status(payload["items"])
    elif action == "run":
        # §5: the truncation flags are optional in a reply, and false when absent.
        flags = {f"{stream}_truncated": payload.get(f"{stream}_truncated", False) for stream in ("stdout", "stderr")}
        assert result == {**{k: v for k, v in payload.items() if k in REQUIRED["run"]}, **flags,
                          "owner_account_id": "acct-a"}
    elif action == "delete":
        assert result == {"deleted": True, "run_id": "run_1", "owner_account_id": "acct-a"}
    elif action == "runner_status":
        assert result == {"status": {"details": {}, **payload["status"]}}
    elif action == "runner_start":
        assert result == {"accepted": payload["accepted"], "action": payload.get("action", "start")}
    elif action == "runner_delete":
        assert result == {"deleted": payload["deleted"]}
    else:
        assert result is None  # billing allowed, usage recorded: nothing to answer, no error


@pytest.mark.parametrize("action", sorted(REQUIRED))
@FUZZ
@given(data=st.data())
def test_a_reply_with_one_required_field_wrong_is_a_502(action, data):
    payload = dict(data.draw(WELL_FORMED[action]))
    name = data.draw(st.sampled_from(sorted(REQUIRED[action])))
    wrong = data.draw(st.sampled_from(REQUIRED[action][name] + ["<missing>"]))
    if wrong == "<missing>":
        payload.pop(name)
    else:
        payload[name] = wrong
    with pytest.raises(BadGateway):
        call(action, {"payload": payload})


@pytest.mark.parametrize("owner_key", ["owner_account_id", "owner_identity_id"])
def test_a_status_reply_addressed_to_another_account_is_a_403_showing_nothing(owner_key):
    """§5: a status reply whose owner differs from the caller is refused, its items (even unowned ones) unseen."""
    items = [{"id": "shared", "state": "ready"}, {"id": "run_1", "state": "done", "owner_account_id": "acct-a"}]
    with pytest.raises(OwnerMismatch) as refused:
        call("status", {"payload": {owner_key: "acct-b", "items": items}})
    assert refused.value.status == 403 and refused.value.type == "forbidden"
    assert call("status", {"payload": {owner_key: "acct-a", "items": items}}) == expected_status(items)
