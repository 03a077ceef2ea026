"""Reply streams through a fault-injecting TCP proxy (tests/faultproxy.py) between the provider
and the real Events API: replies still match, and nothing is lost once the stream is back."""
import concurrent.futures
import logging
import uuid

import pytest

from conftest import bearer, connected, events_env
from faultproxy import FaultProxy
from inflight import RUN_REPLY, RUN_REQUEST, RUNS, caught_up, reply_as_worker, start_run, wait_until


@pytest.fixture
def proxy(events_server):
    with FaultProxy(events_server.port) as fault_proxy:
        yield fault_proxy


@pytest.fixture
def app_env(events_server, proxy):
    # No idle reopen during these tests, so a fault always hits the one stream there is.
    return dict(events_env(events_server), BUS_EVENTS_API_URL=proxy.url, BUS_EVENTS_LISTENER_IDLE_TIMEOUT="60s")


@pytest.fixture
def client(app, responder, proxy, caplog):
    caplog.set_level(logging.INFO, logger="bus_containers_provider.bus")
    connected(app)
    wait_until(lambda: proxy.open_streams() >= 6, what="six container reply streams through the proxy")
    return app.test_client()


def runs_match(client, count=20):
    """`count` concurrent runs from several accounts, each answered with its own output."""
    def one(n):
        account, nonce = f"acct-{n % 4}", uuid.uuid4().hex
        response = client.post(RUNS, headers=bearer(account), json={
            "profile": "sleep:0.05", "args": ["echo", nonce], "timeout_seconds": 10})
        assert response.status_code == 200, response.get_json()
        body = response.get_json()
        assert body["owner_account_id"] == account and body["stdout"] == f"echo {nonce}"

    with concurrent.futures.ThreadPoolExecutor(max_workers=10) as pool:
        list(pool.map(one, range(count)))


def in_flight_survives(client, events_server, fault, publish_during_fault):
    thread, box = start_run(client)
    [request] = events_server.wait_published(RUN_REQUEST, count=1)
    opened = events_server.streams_opened(RUN_REPLY)
    assert fault() >= 1
    if not publish_during_fault:
        wait_until(lambda: events_server.streams_opened(RUN_REPLY) > opened, what="the stream reopening")
    reply_as_worker(events_server, request, stdout="through the fault")
    thread.join(15)
    assert box["response"].status_code == 200
    assert box["response"].get_json()["stdout"] == "through the fault"
    assert events_server.streams_opened(RUN_REPLY) > opened


def test_reset_mid_chunk(client, events_server, proxy, app, caplog):
    # The reply itself is cut in half by the reset: it comes back by catching up.
    in_flight_survives(client, events_server, proxy.reset_mid_chunk, publish_during_fault=True)
    assert f"the {RUN_REPLY} stream dropped" in caplog.text
    wait_until(lambda: caught_up(caplog) != (0, 0), what="the catch-up's log line")  # logged after it resolves
    assert caught_up(caplog) == (1, 1)
    runs_match(client)
    assert app.extensions["bus_containers"].bus.registry.pending() == 0


class TestStall:
    @pytest.fixture
    def app_env(self, events_server, proxy):
        return dict(events_env(events_server), BUS_EVENTS_API_URL=proxy.url, BUS_EVENTS_LISTENER_IDLE_TIMEOUT="1s")

    def test_a_stalled_half_open_stream_is_noticed_by_the_idle_timeout(self, client, events_server, proxy, app,
                                                                       caplog):
        # The stalled connection swallows the reply (unless a replacement opened just before):
        # the idle timeout replaces it, and the reply comes back by catching up.
        in_flight_survives(client, events_server, proxy.stall, publish_during_fault=True)
        assert "dropped" not in caplog.text  # nothing broke: only silence tells a half-open stream
        runs_match(client)
        assert app.extensions["bus_containers"].bus.registry.pending() == 0


def test_one_byte_writes(client, proxy, app):
    proxy.one_byte_writes = True
    runs_match(client)
    assert app.extensions["bus_containers"].bus.registry.pending() == 0


def test_clean_close(client, events_server, proxy, app):
    in_flight_survives(client, events_server, proxy.close_cleanly, publish_during_fault=False)
    runs_match(client)
    assert app.extensions["bus_containers"].bus.registry.pending() == 0
