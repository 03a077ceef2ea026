"""Billing entitlement and usage records around POST /runs, in the contract's order, failing safe."""
import re
import time

import pytest

from conftest import AnsweringBus, assert_error, bearer, connected, env, events_env

# Every test here waits on a provider, a stream or a server: a lost reply fails it at this bound.
pytestmark = pytest.mark.timeout(20)

RUNS = "/api/v1/containers/runs"
BILLING = "bus.billing.entitlement.check.request"
USAGE = "bus.usage.record.request"
RUN = "bus.containers.run.request"
RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


def run(client, account="acct-a", **body):
    body = body or {"image": "alpine", "command": ["echo", "hi"], "timeout_seconds": 1}
    return client.post(RUNS, headers=bearer(account), json=body)


def trail(server):
    """What the provider published, in order: (name, usage event type or None)."""
    return [(e["name"], e["payload"].get("event_type")) for e in server.published()
            if e["name"] in (BILLING, USAGE, RUN)]


@pytest.fixture
def app_env(events_server, responder):
    # The responder outlives the app: the app's stop flushes usage records it must confirm.
    return events_env(events_server, BUS_CONTAINERS_BILLING_BACKEND="events", BUS_CONTAINERS_USAGE_BACKEND="events")


@pytest.fixture
def client(app, responder):
    return connected(app).test_client()


def test_order_is_billing_usage_run_usage(client, events_server, responder):
    response = run(client)
    assert response.status_code == 200
    result = response.get_json()
    events_server.wait_published(USAGE, count=2)
    assert trail(events_server) == [(BILLING, None), (USAGE, "container_run_requested"), (RUN, None),
                                    (USAGE, "container_run_finished")]
    [check] = events_server.published(BILLING)
    assert check["payload"] == {"account_id": "acct-a", "scope": "container:run"}
    requested, finished = [e["payload"] for e in events_server.published(USAGE)]
    assert requested["event_id"] == f"{result['run_id']}:container_run_requested"
    assert finished["event_id"] == f"{result['run_id']}:container_run_finished"
    assert finished["account_id"] == "acct-a" and RFC3339_UTC.match(finished["occurred_at"])
    assert finished["data"] == {"run_id": result["run_id"], "image": "alpine", "duration_ms": result["duration_ms"],
                                "exit_code": 0, "status": "succeeded"}


def test_failed_run_records_container_run_failed(client, events_server):
    assert_error(run(client, profile="error"), 502, "bad_gateway")
    events_server.wait_published(USAGE, count=2)
    failed = events_server.published(USAGE)[-1]["payload"]
    assert failed["event_type"] == "container_run_failed" and failed["data"]["reason"] == "bad_gateway"


@pytest.mark.parametrize("reply,action,command", [
    ({"allowed": False, "reason": "setup_billing"}, "setup_billing", "bus billing setup"),
    ({"allowed": False, "reason": "setup_billing", "command": "bus billing setup --plan containers"},
     "setup_billing", "bus billing setup --plan containers"),
    ({"allowed": False, "reason": "quota_exceeded", "command": "bus billing upgrade",
      "quota": {"feature": "container:run", "meter": "bus_container_runtime_seconds", "window": "day",
                "used": 3600, "limit": 3600}}, "upgrade_plan", "bus billing upgrade"),
    ({"allowed": False}, "setup_billing", "bus billing setup"),
])
def test_billing_denial_is_402_and_nothing_runs(client, events_server, responder, reply, action, command):
    responder.billing["acct-a"] = reply
    error = assert_error(run(client), 402, "billing_required")
    assert error["action"] == action and error["command"] == command
    assert "bus billing" in error["message"]
    if "quota" in reply:
        assert error["details"]["quota"]["meter"] == "bus_container_runtime_seconds"
        assert "3600" in error["message"] and "day" in error["message"]
    time.sleep(0.2)
    assert trail(events_server) == [(BILLING, None)]
    assert run(client, "acct-b").status_code == 200  # other accounts are unaffected


def test_billing_integration_error_is_502_and_nothing_runs(client, events_server, responder):
    responder.billing["acct-a"] = "error"
    response = run(client)
    assert_error(response, 502, "bad_gateway")
    assert trail(events_server) == [(BILLING, None)]


class TestSilence:
    @pytest.fixture
    def app_env(self, events_server, responder):
        # A reply that never comes is waited for the request timeout: short, since nothing will arrive.
        return events_env(events_server, BUS_CONTAINERS_BILLING_BACKEND="events",
                          BUS_CONTAINERS_USAGE_BACKEND="events", BUS_CONTAINERS_REQUEST_TIMEOUT="500ms")

    def test_billing_silence_is_503_and_nothing_runs(self, client, events_server, responder):
        responder.billing["acct-a"] = "never"
        response = run(client)
        assert_error(response, 503, "unavailable")
        assert trail(events_server) == [(BILLING, None)]

    @pytest.mark.parametrize("mode", ["never", "error"])
    def test_usage_requested_not_recorded_is_503_and_nothing_runs(self, client, events_server, responder, mode):
        responder.usage_mode = mode
        assert_error(run(client), 503, "unavailable")
        assert trail(events_server) == [(BILLING, None), (USAGE, "container_run_requested")]


class TestFinishedRecord:
    @pytest.fixture
    def app_env(self, events_server):
        # Longer than the test's own bound: a caller held up by the record could not pass.
        return dict(events_env(events_server, BUS_CONTAINERS_BILLING_BACKEND="events",
                               BUS_CONTAINERS_USAGE_BACKEND="events"), BUS_CONTAINERS_REQUEST_TIMEOUT="60s")

    def test_finished_record_never_holds_up_the_caller(self, app, client, events_server, responder):
        responder.hold_usage.add("container_run_finished")
        assert run(client).status_code == 200
        # The answer came while the finished record still waits for its (withheld) reply.
        events_server.wait_published(USAGE, count=2)
        registry = app.extensions["bus_containers"].bus.registry
        assert registry.pending("bus.usage.record.response") == 1
        registry.mark_down("bus.usage.record.response", "test over")  # release the sender for teardown


def test_usage_finished_failure_keeps_the_result_and_retries(app, client, events_server, responder):
    app.extensions["bus_containers"].usage._retry_delay = 0.05
    responder.refuse_usage["container_run_finished"] = 1
    response = run(client)
    assert response.status_code == 200
    run_id = response.get_json()["run_id"]
    finished = events_server.wait_published(USAGE, count=3)[1:]
    assert [e["payload"]["event_id"] for e in finished] == [f"{run_id}:container_run_finished"] * 2
    deadline = time.monotonic() + 5
    while f"{run_id}:container_run_finished" not in [r["event_id"] for r in responder.usage_records]:
        assert time.monotonic() < deadline
        time.sleep(0.02)


class TestStaticBackendWithEventsBillingAndUsage:
    @pytest.fixture
    def app_env(self, events_server):
        return dict(events_env(events_server), BUS_CONTAINERS_BACKEND="static",
                    BUS_CONTAINERS_BILLING_BACKEND="events", BUS_CONTAINERS_USAGE_BACKEND="events")

    def test_runs_come_from_memory_and_billing_usage_over_events(self, client, events_server):
        response = run(client)
        assert response.status_code == 200 and response.get_json()["runner_name"] == "static"
        events_server.wait_published(USAGE, count=2)
        assert trail(events_server) == [(BILLING, None), (USAGE, "container_run_requested"),
                                        (USAGE, "container_run_finished")]
        assert events_server.open_streams("bus.containers.run.response") == 0


class TestReadinessWaitsForUsageAndBilling:
    @pytest.fixture
    def app_env(self, events_server):
        return dict(events_env(events_server), BUS_CONTAINERS_BACKEND="static", BUS_EVENTS_LISTENER_REQUIRED="1",
                    BUS_CONTAINERS_BILLING_BACKEND="events", BUS_CONTAINERS_USAGE_BACKEND="events")

    def test_readyz(self, app, events_server):
        client = connected(app).test_client()
        assert client.get("/readyz").status_code == 200
        events_server.fail_streams(503)
        events_server.drop_streams()
        # Each listener notices its dropped stream on its own; wait (bounded) until both have.
        names = ("bus.usage.record.response", "bus.billing.entitlement.check.response")
        deadline = time.monotonic() + 10
        while not all(name in (message := client.get("/readyz").get_data(as_text=True)) for name in names):
            assert time.monotonic() < deadline, message
            time.sleep(0.02)
        response = client.get("/readyz")
        assert_error(response, 503, "unavailable")
        assert all(name in response.get_json()["error"]["message"] for name in names)
        events_server.reset_faults()
        connected(app)
        assert client.get("/readyz").get_json() == {"ok": True}


class TestMemoryUsage:
    @pytest.fixture
    def app_env(self):
        return env(BUS_CONTAINERS_USAGE_BACKEND="memory")

    @pytest.fixture
    def client(self, app):
        return app.test_client()

    def test_records_stay_in_process_and_are_idempotent(self, app, client):
        result = run(client).get_json()
        usage = app.extensions["bus_containers"].usage
        assert [r["event_type"] for r in usage.records] == ["container_run_requested", "container_run_finished"]
        assert all(r["account_id"] == "acct-a" and r["data"]["run_id"] == result["run_id"] for r in usage.records)
        usage.record(usage.records[1])
        assert len(usage.records) == 2


class TestNoUsage:
    """--usage-backend none beside an events backend: the run goes over Events, no usage record does."""

    @pytest.fixture
    def app_env(self, events_server):
        return events_env(events_server)

    def test_none_usage_publishes_nothing(self, app, client, events_server):
        assert run(client).status_code == 200
        assert trail(events_server) == [(RUN, None)]  # the app does publish: its run, and nothing else
        assert events_server.open_streams("bus.usage.record.response") == 0
        assert app.extensions["bus_containers"].usage.reply_names == ()


@pytest.mark.parametrize("envelope,status,action", [
    ({"error": {"type": "quota_exceeded", "message": "daily runtime used up"}}, 402, "upgrade_plan"),
    ({"error": {"type": ["quota_exceeded"]}}, 502, None),
    ({"error": {"type": "forbidden", "message": "integration misconfigured"}}, 502, None),
    ({"error": {"type": "quota_exceeded", "message": {"not": "text"}}}, 502, None),
    ({"error": "quota_exceeded"}, 502, None),
    ({"error": {"code": "billing_required", "message": "no plan"}}, 402, "setup_billing"),
    ({"error": {"type": "timeout"}}, 502, None),
    ({"payload": {"allowed": "yes"}}, 502, None),
    ({"payload": ["allowed"]}, 502, None),
    ({}, 502, None),
])
def test_billing_reply_mapping(envelope, status, action):
    from bus_containers_provider.billing import EventsBilling
    from bus_containers_provider.errors import ProviderError

    with pytest.raises(ProviderError) as raised:
        EventsBilling(AnsweringBus(envelope), 1).check("acct-a")
    assert raised.value.status == status and raised.value.action == action
    assert raised.value.type == {402: "billing_required", 502: "bad_gateway"}[status]
    if status == 402:
        assert raised.value.command == "bus billing setup"


def test_quota_in_a_denial_envelope_reaches_the_caller():
    from bus_containers_provider.billing import EventsBilling
    from bus_containers_provider.errors import BillingRequired

    quota = {"feature": "container:run", "meter": "bus_container_runtime_seconds", "window": "month",
             "used": 36000, "limit": 36000}
    with pytest.raises(BillingRequired) as raised:
        EventsBilling(AnsweringBus({"error": {"type": "quota_exceeded", "quota": quota}}), 1).check("acct-a")
    assert raised.value.details["quota"] == quota and raised.value.action == "upgrade_plan"
    assert "36000" in raised.value.message
