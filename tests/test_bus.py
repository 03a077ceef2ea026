"""bus.Bus on its own against the real Events API on 127.0.0.1 (CONTRACT §5): what it publishes,
when it refuses before publishing, how a request's wait ends, and how an envelope's error is read."""
import logging
import re
import threading
import time
import uuid

import pytest
import requests

from conftest import EVENTS_TOKEN, WORKER_TOKEN
from inflight import wait_until

from bus_containers_provider import metrics
from bus_containers_provider.bus import Bus, envelope_error, reply_name_for
from bus_containers_provider.bus.client import EventsClient, EventsRejected, ListenerDown, ReplyTimeout
from bus_containers_provider.config import Settings
from bus_containers_provider.errors import RunCancelled

pytestmark = pytest.mark.timeout(20)

REQUEST, REPLY = "a.request", "a.response"


def settings(url, **extra):
    return Settings(**{"jwt_secret": b"x" * 32, "events_url": url, "api_token": EVENTS_TOKEN, "request_timeout": 7.0,
                       "listener_retry": True, "listener_retry_min": 0.05, "listener_retry_max": 0.2,
                       "listener_down_grace": 0.5, "listener_idle_timeout": 30.0, **extra})


@pytest.fixture
def bus(events_server):
    bus = Bus(settings(events_server.url))
    bus.listen_for(REPLY)
    bus.start()
    assert bus.wait_connected(5)
    yield bus
    bus.stop()


def reply_to(server, request, **payload):
    response = requests.post(f"{server.url}/api/v1/events", timeout=5, headers={
        "Authorization": f"Bearer {WORKER_TOKEN}"}, json={
        "name": reply_name_for(request["name"]), "correlationId": request["correlationId"], "payload": payload})
    assert response.status_code == 202


def is_uuid(value):
    return isinstance(value, str) and str(uuid.UUID(value)) == value


def test_reply_names_follow_request_names():
    assert reply_name_for("bus.containers.run.request") == "bus.containers.run.response"


@pytest.mark.parametrize("envelope,error", [
    ({"payload": {}}, None),
    ({"error": None}, None),
    ({"error": "boom"}, (None, None)),
    ({"error": ["boom"]}, (None, None)),
    ({"error": {}}, (None, None)),
    ({"error": {"type": "not_found", "message": "gone"}}, ("not_found", "gone")),
    ({"error": {"code": "not_found"}}, ("not_found", None)),
    ({"error": {"type": "runner_failed", "code": "not_found"}}, ("runner_failed", None)),
    ({"error": {"type": 5, "message": ["x"]}}, (None, None)),
])
def test_an_envelope_error_is_read_as_type_and_message(envelope, error):
    assert envelope_error(envelope) == error


def test_a_request_is_published_with_a_fresh_correlation_id_and_answered(bus, events_server):
    published = []

    def answer():  # called once the Events API has stored the request
        [request] = events_server.published(REQUEST)
        published.append(request)
        reply_to(events_server, request, n=1)

    envelope = bus.request(REQUEST, {"x": 1}, 5, published=answer)
    [request] = published
    assert request["payload"] == {"x": 1} and is_uuid(request["correlationId"])
    assert envelope["correlationId"] == request["correlationId"] and envelope["payload"] == {"n": 1}
    assert bus.registry.pending() == 0


def test_concurrent_requests_each_get_their_own_reply(bus, events_server):
    results = {}

    def ask(n):
        results[n] = bus.request(REQUEST, {"n": n}, 5)["payload"]

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    requests_ = events_server.wait_published(REQUEST, count=2)
    assert len({r["correlationId"] for r in requests_}) == 2
    for request in reversed(requests_):
        reply_to(events_server, request, n=request["payload"]["n"])
    for thread in threads:
        thread.join(10)
    assert results == {0: {"n": 0}, 1: {"n": 1}}


def test_no_reply_is_a_reply_timeout_after_the_wait(bus):
    with pytest.raises(ReplyTimeout, match=re.escape(f"no {REPLY} reply within 0.2s")):
        bus.request(REQUEST, {}, 0.2)
    assert bus.registry.pending() == 0


def test_a_cancelled_wait_ends_with_the_reason(bus):
    with pytest.raises(RunCancelled, match="the caller went away"):
        bus.request(REQUEST, {}, 10, cancelled=lambda: "the caller went away")
    assert bus.registry.pending() == 0


def test_notify_publishes_with_a_fresh_correlation_id_and_waits_for_nothing(bus, events_server):
    bus.notify(REQUEST, {"run_id": "r"})
    bus.notify(REQUEST, {"run_id": "r"})
    sent = events_server.published(REQUEST)
    assert [e["payload"] for e in sent] == [{"run_id": "r"}] * 2
    assert all(is_uuid(e["correlationId"]) for e in sent) and sent[0]["correlationId"] != sent[1]["correlationId"]
    assert bus.registry.pending() == 0


def test_a_request_without_a_listener_for_its_reply_is_refused(bus, events_server):
    with pytest.raises(ListenerDown, match=re.escape("the b.response listener is not connected")):
        bus.request("b.request", {}, 5)
    assert events_server.published() == []


@pytest.fixture
def down(events_server):
    """Start a Bus with `grace`, drop its stream and refuse reopening it; the listener's waits recorded."""
    buses = []

    def start(grace):
        bus = Bus(settings(events_server.url, listener_down_grace=grace))
        buses.append(bus)
        bus.listen_for(REPLY)
        bus.start()
        assert bus.wait_connected(5)
        events_server.fail_streams(503)
        assert events_server.drop_streams(REPLY) == 1
        wait_until(lambda: bus.disconnected() == [REPLY], timeout=5, what="the drop noticed")
        listener, asked = bus._listeners[REPLY], []
        listener.wait_connected = lambda timeout: asked.append(timeout) or listener.connected
        return bus, asked

    yield start
    events_server.reset_faults()
    for bus in buses:
        bus.stop()


def test_a_request_on_a_dropped_stream_waits_up_to_the_down_grace_then_is_refused_unpublished(down, events_server):
    bus, asked = down(30.0)
    with pytest.raises(ListenerDown) as refused:
        bus.request(REQUEST, {}, 10)
    assert str(refused.value) == f"the {REPLY} listener is not connected"
    assert asked == [30.0] and events_server.published() == []


def test_a_request_on_a_stream_down_past_its_grace_is_refused_without_waiting(down, events_server):
    bus, asked = down(0.2)
    wait_until(lambda: bus.registry.is_down(REPLY), timeout=5, what="the down grace ending")
    with pytest.raises(ListenerDown, match=re.escape(f"the {REPLY} listener is not connected")):
        bus.request(REQUEST, {}, 10)
    assert asked == [] and events_server.published() == []


def test_disconnected_names_every_reply_stream_before_start(events_server):
    bus = Bus(settings(events_server.url))
    bus.listen_for("b.response", "a.response")
    assert bus.disconnected() == ["a.response", "b.response"]


def test_wait_connected_gives_up_after_its_timeout(events_server):
    events_server.fail_streams(503)
    bus = Bus(settings(events_server.url))
    bus.listen_for(REPLY)
    bus.start()
    try:
        assert bus.wait_connected(0.2) is False
        assert bus.disconnected() == [REPLY]
    finally:
        bus.stop()


def test_a_given_client_is_used(events_server):
    client = EventsClient(events_server.url, EVENTS_TOKEN)
    assert Bus(settings(events_server.url), client).client is client
    client.close()


def test_the_own_client_publishes_with_the_request_timeout(events_server):
    bus = Bus(settings(events_server.url, request_timeout=7.0))
    bus.notify(REQUEST, {})
    assert bus.client._publisher._timeouts == (5.0, 7.0)
    assert [e["name"] for e in events_server.published()] == [REQUEST]  # with the provider's token
    bus.stop()


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_provider_token_on_publish_is_logged_with_the_event_name(bus, events_server, caplog, status):
    events_server.fail_publish(status)
    with pytest.raises(EventsRejected):
        bus.request(REQUEST, {}, 5)
    [record] = [r for r in caplog.records if r.name == "bus_containers_provider.bus"]
    assert record.levelno == logging.ERROR
    assert record.getMessage() == f"the Events API refused the provider's token for {REQUEST} (HTTP {status})"
    assert EVENTS_TOKEN not in caplog.text
    assert bus.registry.pending() == 0


def test_the_reply_time_is_observed_under_the_reply_name(bus, events_server, monkeypatch):
    observed = []

    class Series:
        class EVENTS_REPLY:
            @staticmethod
            def labels(event):
                return type("Child", (), {"observe": lambda self, seconds: observed.append((event, seconds))})()

    monkeypatch.setattr(metrics, "_series", Series())
    bus.request(REQUEST, {}, 5, published=lambda: reply_to(events_server, events_server.published(REQUEST)[0]))
    [(event, seconds)] = observed
    assert event == REPLY and seconds >= 0
