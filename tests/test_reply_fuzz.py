"""Whatever an integration replies, the provider answers with its own errors, never a crash."""
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bus_containers_provider.backends import RunRequest, Watch
from bus_containers_provider.backends.events import EventsBackend
from bus_containers_provider.billing import EventsBilling
from bus_containers_provider.config import Settings
from bus_containers_provider.errors import ProviderError
from bus_containers_provider.usage import EventsUsage
from conftest import AnsweringBus

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


RUN = RunRequest(run_id="run_1", owner_account_id="acct-a", command=["true"], image="alpine")
ACTIONS = {
    "status": lambda backend, billing, usage: backend.status("acct-a"),
    "run": lambda backend, billing, usage: backend.run(RUN, Watch()),
    "delete": lambda backend, billing, usage: backend.delete("acct-a", "run_1"),
    "runner_status": lambda backend, billing, usage: backend.runner_status(),
    "runner_start": lambda backend, billing, usage: backend.runner_start(),
    "runner_delete": lambda backend, billing, usage: backend.runner_delete(),
    "billing": lambda backend, billing, usage: billing.check("acct-a"),
    "usage": lambda backend, billing, usage: usage.record({"event_id": "e", "data": {"run_id": "run_1"}}),
}


@pytest.mark.parametrize("action", sorted(ACTIONS))
@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(envelope=envelopes)
def test_any_reply_is_a_result_or_a_provider_error(action, envelope):
    bus = AnsweringBus(envelope)
    backend = EventsBackend(bus, Settings(jwt_secret=b"x" * 32))
    try:
        result = ACTIONS[action](backend, EventsBilling(bus, 1), EventsUsage(bus, 1))
    except ProviderError as exc:
        assert 400 <= exc.status < 600 and isinstance(exc.message, str)
        return
    json.dumps(result, allow_nan=False)  # whatever passes is valid JSON for the caller
    if action == "status":
        assert all(item.get("owner_account_id") in (None, "acct-a") for item in result)
    if action in ("run", "delete"):
        assert result["owner_account_id"] == "acct-a" and result["run_id"] == "run_1"
