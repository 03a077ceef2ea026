"""--backend events through the Flask client, against a real Events API and responder."""
import time

import pytest

from conftest import INTERNAL, AnsweringBus, assert_error, bearer, connected, events_env

# Every test here waits on a provider, a stream or a server: a lost reply fails it at this bound.
pytestmark = pytest.mark.timeout(20)

RUNS = "/api/v1/containers/runs"
STATUS = "/api/v1/containers/status"
RUNNER = "/api/internal/containers/runner"
REQUEST_NAMES = ["bus.containers.status.request", "bus.containers.run.request", "bus.containers.delete.request"]


@pytest.fixture
def app_env(events_server):
    return events_env(events_server)


@pytest.fixture
def client(app, responder):
    return connected(app).test_client()


def run(client, subject="acct-a", **body):
    if "profile" not in body and "image" not in body:
        body = {"image": "alpine", "command": ["echo", "hello"], **body}
    return client.post(RUNS, headers=bearer(subject), json=body)


def error_type(response):
    return response.get_json()["error"]["type"]


def test_run_is_delegated_and_answered(client, events_server):
    response = run(client, timeout_seconds=20)
    assert response.status_code == 200
    result = response.get_json()
    assert result["owner_account_id"] == "acct-a" and result["stdout"] == "echo hello"
    assert result["runner_name"] == "responder" and result["runtime"]["provider"] == "responder"
    [published] = events_server.published("bus.containers.run.request")
    assert published["payload"] == {"run_id": result["run_id"], "owner_account_id": "acct-a",
                                    "image": "alpine", "command": ["echo", "hello"], "timeout_seconds": 20,
                                        "max_output_bytes": 1048576}
    assert published["correlationId"]


def test_non_zero_exit_is_still_a_200(client):
    response = run(client, profile="exit:3", args=["false"])
    assert response.status_code == 200
    assert response.get_json()["exit_code"] == 3


@pytest.mark.parametrize("profile", ["owner-identity", "snake-correlation"])
def test_reply_synonyms_are_accepted(client, profile):
    response = run(client, profile=profile, args=["true"])
    assert response.status_code == 200 and response.get_json()["owner_account_id"] == "acct-a"


def test_reply_for_another_owner_is_403_and_never_shown(client):
    response = run(client, profile="wrong-owner", args=["secret-output"])
    assert response.status_code == 403 and error_type(response) == "forbidden"
    assert b"someone-else" not in response.data and b"secret-output" not in response.data


@pytest.mark.parametrize("profile,status,kind", [("malformed", 502, "bad_gateway"), ("error", 502, "bad_gateway")])
def test_bad_replies_are_502(client, profile, status, kind):
    response = run(client, profile=profile)
    assert response.status_code == status and error_type(response) == kind


def test_no_reply_is_503_after_the_run_wait(client, app):
    started = time.monotonic()
    response = run(client, profile="never", timeout_seconds=1)
    elapsed = time.monotonic() - started
    assert_error(response, 503, "unavailable")
    assert 2.5 <= elapsed < 10  # timeout_seconds (1) + grace (2), bounded
    assert app.extensions["bus_containers"].bus.registry.pending() == 0


def test_status_is_filtered_to_the_caller(client):
    mine = run(client).get_json()["run_id"]
    theirs = run(client, "acct-b").get_json()["run_id"]
    items = client.get(STATUS, headers=bearer()).get_json()["items"]
    assert {"id": "runner-1", "state": "ready"} in items
    ids = {item["id"] for item in items}
    assert mine in ids and theirs not in ids and "run_other" not in ids
    assert [i["id"] for i in client.get(RUNS, headers=bearer()).get_json()["items"]] == [mine]
    assert client.get(f"{RUNS}/{mine}", headers=bearer()).status_code == 200
    assert_error(client.get(f"{RUNS}/{mine}", headers=bearer("acct-b")), 404, "not_found")
    assert_error(client.get(f"{RUNS}/run_other", headers=bearer()), 404, "not_found")


def test_delete_own_foreign_and_unknown(client):
    mine = run(client).get_json()["run_id"]
    foreign = client.delete(f"{RUNS}/{mine}", headers=bearer("acct-b"))
    assert foreign.status_code == 404 and error_type(foreign) == "not_found"
    assert mine.encode() not in foreign.data
    deleted = client.delete(f"{RUNS}/{mine}", headers=bearer())
    assert deleted.status_code == 200
    assert deleted.get_json() == {"deleted": True, "run_id": mine, "owner_account_id": "acct-a"}
    unknown = client.delete(f"{RUNS}/{mine}", headers=bearer())
    assert unknown.status_code == 404 and error_type(unknown) == "not_found"


def test_internal_runner_routes(client, events_server):
    admin = bearer("operator", "container:admin", INTERNAL)
    assert client.get(RUNNER, headers=admin).get_json()["status"]["provider"] == "responder"
    assert client.post(RUNNER, headers=admin).status_code == 202
    assert client.delete(RUNNER, headers=admin).get_json() == {"deleted": True}
    for name in ("status", "start", "delete"):
        [event] = events_server.published(f"bus.containers.runner.{name}.request")
        assert event["payload"] == {}


def test_one_stream_per_reply_name(client, events_server):
    for name in ("status", "run", "delete", "runner.status", "runner.start", "runner.delete"):
        assert events_server.open_streams(f"bus.containers.{name}.response") == 1


def test_events_api_down_is_503_quickly(client, events_server, app):
    events_server.fail_publish(503)
    response = run(client)
    # Refused at publish, not after waiting for a reply that could not come.
    assert "publishing bus.containers.run.request" in assert_error(response, 503, "unavailable")["message"]
    assert app.extensions["bus_containers"].bus.registry.pending() == 0


@pytest.mark.parametrize("status,expected", [(400, 502), (404, 502), (413, 502), (422, 502), (401, 503),
                                             (403, 503), (408, 503), (429, 503), (500, 503)])
def test_publish_refusals_map_to_502_or_503(client, events_server, status, expected):
    events_server.fail_publish(status)
    assert_error(client.get(STATUS, headers=bearer()), expected, {502: "bad_gateway", 503: "unavailable"}[expected])


def test_dropped_stream_reconnects_and_serves_again(client, events_server):
    name = "bus.containers.run.response"
    opened = events_server.streams_opened(name)
    assert events_server.drop_streams(name) == 1
    deadline = time.monotonic() + 5
    while not (events_server.streams_opened(name) > opened and events_server.open_streams(name) == 1):
        assert time.monotonic() < deadline, "the listener did not reconnect"
        time.sleep(0.02)
    assert run(client, timeout_seconds=1).status_code == 200


def test_new_requests_are_refused_before_publishing_while_the_stream_stays_down(app, events_server, responder):
    client = connected(app).test_client()
    events_server.fail_streams(503)
    events_server.drop_streams()
    bus = app.extensions["bus_containers"].bus
    deadline = time.monotonic() + 5
    while "bus.containers.run.response" not in bus.disconnected():  # the drop noticed, not raced
        assert time.monotonic() < deadline, "the dropped stream was never noticed"
        time.sleep(0.02)
    started = time.monotonic()
    response = run(client, profile="never", timeout_seconds=30)
    assert_error(response, 503, "unavailable")
    assert time.monotonic() - started < 5  # the down grace (1s), not the 32 s run wait
    assert events_server.published("bus.containers.run.request") == []
    events_server.reset_faults()
    connected(app)
    assert run(client).status_code == 200


class TestReadiness:
    @pytest.fixture
    def app_env(self, events_server):
        return events_env(events_server, BUS_EVENTS_LISTENER_REQUIRED="1")

    def test_readyz_names_missing_listeners_until_connected(self, app, events_server):
        client = app.test_client()
        connected(app)
        assert client.get("/readyz").get_json() == {"ok": True}
        events_server.fail_streams(503)
        events_server.drop_streams("bus.containers.delete.response")
        deadline = time.monotonic() + 5
        while (response := client.get("/readyz")).status_code == 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert_error(response, 503, "unavailable")
        assert "bus.containers.delete.response" in response.get_json()["error"]["message"]
        assert "bus.containers.run.response" not in response.get_json()["error"]["message"]
        events_server.reset_faults()
        connected(app)
        assert client.get("/readyz").status_code == 200


class TestWithoutRetry:
    @pytest.fixture
    def app_env(self, events_server):
        return dict(events_env(events_server), BUS_EVENTS_LISTENER_RETRY="0", BUS_EVENTS_LISTENER_REQUIRED="1")

    def test_a_failed_listener_stays_down(self, app, events_server):
        connected(app)
        events_server.fail_streams(503)
        events_server.drop_streams("bus.containers.status.response")
        listener = app.extensions["bus_containers"].bus._listeners["bus.containers.status.response"]
        listener.join(5)  # its one reopen refused, it ends: nothing reopens the stream now
        assert not listener.is_alive()
        events_server.reset_faults()
        response = app.test_client().get("/readyz")
        assert_error(response, 503, "unavailable")
        assert_error(app.test_client().get(STATUS, headers=bearer()), 503, "unavailable")


def test_events_url_with_api_suffix_is_trimmed(events_server):
    from bus_containers_provider import create_app

    app = create_app(dict(events_env(events_server), BUS_EVENTS_API_URL=events_server.url + "/api/v1/events/"))
    assert app.extensions["bus_containers"].settings.events_url == events_server.url


@pytest.mark.parametrize("action", ["run", "delete"])
def test_a_reply_about_another_run_is_502(action):
    from bus_containers_provider.backends.events import EventsBackend
    from bus_containers_provider.config import Settings
    from bus_containers_provider.errors import BadGateway

    reply = {"run_id": "run_other", "owner_account_id": "acct-a", "deleted": True, "runner_name": "r",
             "image": "alpine", "args": [], "exit_code": 0, "stdout": "", "stderr": "", "duration_ms": 1,
             "runtime": {"state": "ready", "provider": "r"}}
    backend = EventsBackend(AnsweringBus({"payload": reply}), Settings(jwt_secret=b"x" * 32))
    with pytest.raises(BadGateway):
        if action == "run":
            backend.result({"payload": reply}, "run_mine")
        else:
            backend.delete("acct-a", "run_mine")


def test_requests_wait_for_a_reconnecting_stream_instead_of_publishing_into_the_gap(client, events_server, app):
    import threading

    listener = app.extensions["bus_containers"].bus._listeners["bus.containers.run.response"]
    events_server.fail_streams(503)
    events_server.drop_streams("bus.containers.run.response")
    deadline = time.monotonic() + 5
    while listener.connected:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    threading.Timer(0.1, events_server.reset_faults).start()  # back well within the 1 s down grace
    started = time.monotonic()
    response = run(client, timeout_seconds=10)
    assert response.status_code == 200
    assert time.monotonic() - started < 2  # it waited for the stream, not for a lost reply's timeout


def test_building_the_app_starts_no_thread_and_opens_no_stream(events_server, monkeypatch):
    import threading

    from bus_containers_provider import create_app, start, stop

    # Thread starts are counted while the app is built, not the process's threads compared: a daemon
    # thread of an earlier test may end (or its timer fire) meanwhile.
    started, original = [], threading.Thread.start
    monkeypatch.setattr(threading.Thread, "start", lambda thread: started.append(thread.name) or original(thread))
    app = create_app(events_env(events_server, BUS_CONTAINERS_USAGE_BACKEND="events"))
    monkeypatch.setattr(threading.Thread, "start", original)
    assert started == [] and events_server.streams_opened() == 0
    start(app)
    try:
        connected(app)
        assert events_server.open_streams() == 7  # six container replies and usage
    finally:
        stop(app)
    assert events_server.wait_for_streams(0, timeout=5)


def test_a_refused_provider_token_is_logged_with_the_event_name_never_the_token(events_server, caplog):
    from bus_containers_provider import create_app, start, stop

    app = create_app(dict(events_env(events_server), BUS_API_TOKEN="wrong-token-value",
                          BUS_EVENTS_LISTENER_REQUIRED="1"))
    start(app)
    try:
        deadline = time.monotonic() + 5
        while "refused the provider's token for bus.containers.run.response" not in caplog.text:
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.05)
        assert_error(app.test_client().get("/readyz"), 503, "unavailable")
        assert_error(app.test_client().get(STATUS, headers=bearer()), 503, "unavailable")
    finally:
        stop(app)
    assert "wrong-token-value" not in caplog.text


@pytest.mark.timeout(20)
@pytest.mark.parametrize("action", ["run", "status", "runner"])
def test_a_reply_faster_than_the_publish_answer_is_not_lost(client, app, events_server, monkeypatch, action):
    """§5: the waiter is registered before publishing, so a reply that arrives first still finds it.

    The publisher is held, after the Events API accepted the request, until the
    listener has read the reply off the stream: the reply is then certain to
    come first, with no timing involved.
    """
    import threading

    bus = app.extensions["bus_containers"].bus
    read, handed = {}, []
    real_resolve, real_publish = bus.registry.resolve, bus.client.publish

    def resolve(reply_name, envelope):
        handed.append(real_resolve(reply_name, envelope))
        read.setdefault(envelope.get("correlationId"), threading.Event()).set()
        return handed[-1]

    def publish(name, correlation_id, payload):
        real_publish(name, correlation_id, payload)
        assert read.setdefault(correlation_id, threading.Event()).wait(5), "no reply was read"

    monkeypatch.setattr(bus.registry, "resolve", resolve)
    monkeypatch.setattr(bus.client, "publish", publish)
    if action == "run":
        response = run(client, timeout_seconds=1)
    elif action == "status":
        response = client.get(STATUS, headers=bearer())
    else:
        response = client.get(RUNNER, headers=bearer("operator", "container:admin", INTERNAL))
    assert response.status_code == 200, response.get_data(as_text=True)
    assert handed == [True]


def test_listener_retry_backs_off_exponentially_up_to_the_maximum(events_server):
    """§1: BUS_EVENTS_LISTENER_RETRY_MIN doubles up to _MAX while the stream cannot be opened.

    The listener's pause between attempts is recorded instead of slept, so the
    sequence is exact and the test takes no time.
    """
    import threading

    from bus_containers_provider.bus.client import EventsClient
    from bus_containers_provider.bus.listener import Listener
    from bus_containers_provider.bus.replies import ReplyRegistry

    class RecordedPauses(threading.Event):
        def __init__(self, stop_after):
            super().__init__()
            self.pauses, self._stop_after = [], stop_after

        def wait(self, timeout=None):
            self.pauses.append(timeout)
            if len(self.pauses) >= self._stop_after:
                self.set()
            return self.is_set()

    events_server.fail_streams(503)
    client = EventsClient(events_server.url, "provider-events-token")
    listener = Listener(client, "bus.containers.run.response", ReplyRegistry(), retry=True, retry_min=0.05,
                        retry_max=0.4, down_grace=1, idle_timeout=5)
    listener._stopping = RecordedPauses(stop_after=7)
    listener.start()
    listener.join(10)
    listener.stop()
    client.close()
    assert not listener.is_alive()
    assert listener._stopping.pauses[:7] == [0.05, 0.1, 0.2, 0.4, 0.4, 0.4, 0.4]
    assert events_server.streams_opened("bus.containers.run.response") == 0
