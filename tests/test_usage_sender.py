"""The background usage sender: one slow record holds no other, and a shutdown flushes what is pending."""
import concurrent.futures
import logging
import os
import signal
import uuid

import pytest
import requests

from conftest import EVENTS_TOKEN, bearer, connected, events_env
from inflight import wait_until
from processes import console_script, provider_env

RUNS = "/api/v1/containers/runs"
USAGE_REPLY = "bus.usage.record.response"
FINISHED = "container_run_finished"


@pytest.fixture
def app_env(events_server):
    return dict(events_env(events_server), BUS_CONTAINERS_BACKEND="static", BUS_CONTAINERS_USAGE_BACKEND="events",
                BUS_CONTAINERS_REQUEST_TIMEOUT="20s")


@pytest.fixture
def client(app, responder):
    return connected(app).test_client()


def run(client, account="acct-a"):
    response = client.post(RUNS, headers=bearer(account), json={"profile": "codex"})
    assert response.status_code == 200
    return response.get_json()["run_id"]


def recorded(responder, event_type=FINISHED):
    return [r["event_id"] for r in responder.usage_records if r["event_type"] == event_type]


def test_one_record_without_a_reply_holds_no_other(app, client, responder):
    responder.ignore_usage[FINISHED] = 1  # the first finished record is never answered
    held = run(client)
    wait_until(lambda: app.extensions["bus_containers"].bus.registry.pending(USAGE_REPLY) == 1,
               what="the first record waiting for its reply")
    others = [run(client, f"acct-{n}") for n in range(5)]
    wait_until(lambda: set(recorded(responder)) >= {f"{r}:{FINISHED}" for r in others}, what="the other records")
    # The first still waits for its reply (its 20 s timeout has not passed): the others went past it.
    assert app.extensions["bus_containers"].bus.registry.pending(USAGE_REPLY) == 1
    assert f"{held}:{FINISHED}" not in recorded(responder)


def test_stop_flushes_records_waiting_out_a_retry(app, client, responder, caplog):
    from bus_containers_provider import stop

    usage = app.extensions["bus_containers"].usage
    usage._retry_delay = 3600.0  # a refused record would wait an hour for its retry
    responder.refuse_usage[FINISHED] = 3
    runs = [run(client, f"acct-{n}") for n in range(3)]
    wait_until(lambda: responder.refuse_usage[FINISHED] == 0, what="three refusals")
    caplog.set_level(logging.ERROR)
    stop(app)
    assert sorted(recorded(responder)) == sorted(f"{r}:{FINISHED}" for r in runs)
    assert "not recorded before shutdown" not in caplog.text


class TestFlushIsBounded:
    @pytest.fixture
    def app_env(self, events_server):
        return dict(events_env(events_server), BUS_CONTAINERS_BACKEND="static", BUS_CONTAINERS_USAGE_BACKEND="events",
                    BUS_CONTAINERS_REQUEST_TIMEOUT="60s")

    def test_a_record_that_cannot_be_sent_is_logged_by_run_when_the_flush_ends(self, app, client, responder,
                                                                              caplog):
        usage = app.extensions["bus_containers"].usage
        usage._flush_timeout = 0.5
        responder.hold_usage.add(FINISHED)
        run_id = run(client)
        wait_until(lambda: app.extensions["bus_containers"].bus.registry.pending(USAGE_REPLY) == 1,
                   what="the record waiting for its reply")
        usage.stop()  # bounded by the flush timeout, not the 60 s request timeout
        assert f"usage {FINISHED} for run {run_id} not recorded before shutdown" in caplog.text


def test_sigterm_with_records_pending_records_each_once(events_server, responder):
    listener = {k: v for k, v in events_env(events_server).items() if k.startswith("BUS_EVENTS_LISTENER")}
    env = provider_env(BUS_API_TOKEN=EVENTS_TOKEN, BUS_EVENTS_API_URL=events_server.url,
                       BUS_CONTAINERS_USAGE_BACKEND="events", **listener)
    responder.refuse_usage[FINISHED] = 10  # each finished record waits out a retry backoff
    with console_script("--backend", "events", "--workers", "2", env=env) as provider:
        def one(n):
            response = requests.post(f"{provider.url}{RUNS}", headers=bearer(f"acct-{n % 3}"), timeout=30,
                                     json={"profile": "sleep:0", "args": ["echo", uuid.uuid4().hex]})
            assert response.status_code == 200, response.text
            return response.json()["run_id"]

        with concurrent.futures.ThreadPoolExecutor(max_workers=10) as pool:
            runs = list(pool.map(one, range(10)))
        wait_until(lambda: responder.refuse_usage[FINISHED] == 0, what="ten refusals")
        os.killpg(provider.pid, signal.SIGTERM)
        assert provider.wait(timeout=30) == 0
    assert "not recorded before shutdown" not in provider.output
    assert sorted(recorded(responder)) == sorted(f"{r}:{FINISHED}" for r in runs)
