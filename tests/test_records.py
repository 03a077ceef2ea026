"""Billing denials, the usage sender's retries and backlog, and the static backend's memory bound, as units."""
import logging
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

from bus_containers_provider.backends import RunRequest
from bus_containers_provider.backends.static import StaticBackend
from bus_containers_provider.billing import EventsBilling, denial
from bus_containers_provider.errors import BillingRequired, StateUnavailable, Unavailable
from bus_containers_provider.state.memory import MemoryStore
from bus_containers_provider.usage import EventsUsage, usage_event
from conftest import AnsweringBus, Changes

pytestmark = pytest.mark.timeout(30)


def test_a_denial_names_its_reason_and_carries_the_integration_message():
    refused = denial({"allowed": False, "message": "no payment method on file"})
    assert refused.details == {"reason": "billing_required"}
    assert refused.message.startswith("no payment method on file")
    assert refused.action == "setup_billing" and refused.command == "bus billing setup"


def test_a_denial_with_a_reason_and_a_quota_keeps_both():
    quota = {"feature": "container:run", "meter": "seconds", "window": "day", "used": 10, "limit": 10}
    refused = denial({"allowed": False, "reason": "quota_exceeded", "quota": quota})
    assert refused.details == {"reason": "quota_exceeded", "quota": quota}
    assert refused.action == "upgrade_plan"


def test_a_denial_reply_reaches_the_caller_through_the_check():
    bus = AnsweringBus({"payload": {"allowed": False, "reason": "setup_billing", "message": "set up billing first"}})
    with pytest.raises(BillingRequired) as raised:
        EventsBilling(bus, 1).check("acct-a")
    assert raised.value.status == 402 and raised.value.details == {"reason": "setup_billing"}
    assert "set up billing first" in raised.value.message


class FailingBus:
    """Refuses every usage record, counting the attempts."""

    def __init__(self):
        self.attempts = 0
        self.lock = threading.Lock()

    def request(self, name, payload, timeout):
        with self.lock:
            self.attempts += 1
        return {"payload": {"recorded": False}}


EVENT = {"event_type": "container_run_finished", "event_id": "run_1:container_run_finished",
         "data": {"run_id": "run_1"}}


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_a_record_made_later_is_tried_six_times_then_given_up_and_logged(caplog):
    bus = FailingBus()
    usage = EventsUsage(bus, 1, retry_delay=0.001)
    usage.start()
    try:
        usage.record_later(EVENT)
        wait_for(lambda: "lost after" in caplog.text)
    finally:
        usage.stop()
    assert bus.attempts == EventsUsage.ATTEMPTS == 6
    assert "usage container_run_finished for run run_1 lost after 6 attempts" in caplog.text


def test_the_backlog_is_bounded_and_a_dropped_record_is_logged(caplog):
    caplog.set_level(logging.ERROR)
    usage = EventsUsage(FailingBus(), 1)
    usage.BACKLOG = 2  # never started: records stay queued
    for n in range(3):
        usage.record_later(dict(EVENT, data={"run_id": f"run_{n}"}))
    dropped = [r.getMessage() for r in caplog.records if "backlog is full" in r.getMessage()]
    assert dropped == ["usage container_run_finished for run run_2 dropped: the backlog is full"]
    usage.stop()
    assert "not recorded before shutdown" in caplog.text


def test_a_refused_record_before_a_run_raises():
    with pytest.raises(Unavailable):
        EventsUsage(FailingBus(), 1).record(EVENT)


def run_request(n):
    return RunRequest(run_id=f"run_{n}", owner_account_id="acct-a", command=["true"], image="alpine")


def test_the_static_backend_forgets_its_oldest_runs_beyond_its_bound():
    backend = StaticBackend(max_runs=2)
    for n in range(3):
        backend.start(run_request(n), f"c{n}", lambda reply, error: None)
    assert [item["id"] for item in backend.runs("acct-a")] == ["run_1", "run_2"]
    backend.start(run_request(3), "c3", lambda reply, error: None)
    assert [item["id"] for item in backend.runs("acct-a")] == ["run_2", "run_3"]


# What counts under which label (README, "Metrics"): billing denials by action, usage records lost by reason.

@pytest.mark.parametrize("reply,action", [
    ({"allowed": False, "reason": "billing_required"}, "setup_billing"),
    ({"allowed": False, "reason": "quota_exceeded"}, "upgrade_plan"),
    ({"allowed": False, "action": "call_sales"}, "other"),
])
def test_a_billing_denial_counts_under_its_action(counted, reply, action):
    with Changes(counted, "bus_containers_billing_denials_total", "action",
                 ["setup_billing", "upgrade_plan", "other"]) as changes:
        with pytest.raises(BillingRequired):
            EventsBilling(AnsweringBus({"payload": reply}), 1).check("acct-a")
    assert changes.delta == {action: 1}


LOST = "bus_containers_usage_records_lost_total"
PENDING = "bus_containers_usage_records_pending"


def lost(counted):
    return Changes(counted, LOST, "reason", ["attempts", "backlog_full", "shutdown"])


def test_a_record_given_up_after_its_attempts_counts_as_lost_attempts(counted):
    usage = EventsUsage(FailingBus(), 1, retry_delay=0.001, senders=1)
    with lost(counted) as changes:
        usage.start()
        usage.record_later(EVENT)
        wait_for(lambda: counted(LOST, reason="attempts") > changes.before["attempts"])
        usage.stop()
    assert changes.delta == {"attempts": 1}
    assert counted(PENDING) == 0


def test_a_record_over_the_backlog_counts_as_backlog_full_and_the_queued_ones_at_shutdown(counted):
    usage = EventsUsage(FailingBus(), 1, flush_timeout=0)
    usage.BACKLOG = 2  # never started: records stay queued
    with lost(counted) as changes:
        for n in range(3):
            usage.record_later(dict(EVENT, event_id=f"run_{n}:container_run_finished", data={"run_id": f"run_{n}"}))
        assert counted(PENDING) == 2
        usage.stop()
    assert changes.delta == {"backlog_full": 1, "shutdown": 2}
    assert counted(PENDING) == 0


class ScriptedBus:
    """Answers usage records by event_id: recorded, refused a number of times first, or never (held).

    A held request waits as a real one does, up to the timeout it was given, and then raises
    Unavailable (a reply timeout); `release` ends every wait at once (the test is over).
    """

    def __init__(self, refuse=None, hold=()):
        self.refuse = dict(refuse or {})
        self.hold = set(hold)
        self.recorded = []
        self.timeouts = []
        self.names = set()
        self.lock = threading.Lock()
        self.released = threading.Event()

    def request(self, name, payload, timeout):
        event_id = payload["event_id"]
        with self.lock:
            self.names.add(name)
            self.timeouts.append((event_id, timeout))
            if self.refuse.get(event_id, 0) > 0:
                self.refuse[event_id] -= 1
                return {"payload": {"recorded": False}}
        if event_id in self.hold:
            self.released.wait(timeout)
            raise Unavailable("no reply in time")
        with self.lock:
            self.recorded.append(event_id)
        return {"payload": {"recorded": True}}

    def tries(self, event_id):
        with self.lock:
            return [t for e, t in self.timeouts if e == event_id]


def finished(n):
    return dict(EVENT, event_id=f"run_{n}:container_run_finished", data={"run_id": f"run_{n}"})


def test_a_record_without_a_reply_holds_no_other_record():
    bus = ScriptedBus(hold={"run_0:container_run_finished"})
    usage = EventsUsage(bus, 30, senders=2)
    usage.start()
    try:
        for n in range(6):
            usage.record_later(finished(n))
        wait_for(lambda: len(bus.recorded) == 5)
        assert "run_0:container_run_finished" not in bus.recorded
    finally:
        bus.hold.clear()
        bus.released.set()
        usage.stop()


def test_a_refused_record_is_tried_again_after_its_backoff_and_recorded():
    bus = ScriptedBus(refuse={"run_1:container_run_finished": 2})
    usage = EventsUsage(bus, 5, retry_delay=0.01, senders=1)
    usage.start()
    try:
        usage.record_later(finished(1))
        wait_for(lambda: bus.recorded == ["run_1:container_run_finished"])
    finally:
        usage.stop()
    assert len(bus.tries("run_1:container_run_finished")) == 3
    assert bus.names == {"bus.usage.record.request"}  # §5: the usage request event


def test_stop_sends_at_once_the_records_waiting_out_a_retry(counted):
    bus = ScriptedBus(refuse={f"run_{n}:container_run_finished": 1 for n in range(3)})
    usage = EventsUsage(bus, 5, retry_delay=3600.0, senders=2)  # a refused record would wait an hour
    usage.start()
    for n in range(3):
        usage.record_later(finished(n))
    wait_for(lambda: all(bus.tries(f"run_{n}:container_run_finished") for n in range(3)))
    with Changes(counted, "bus_containers_usage_records_lost_total", "reason", ["shutdown"]) as lost:
        usage.stop()
    assert sorted(bus.recorded) == [f"run_{n}:container_run_finished" for n in range(3)]
    assert lost.delta == {}


def test_a_flush_is_bounded_by_its_timeout_not_by_the_request_timeout(counted):
    bus = ScriptedBus(refuse={"run_1:container_run_finished": 1})
    usage = EventsUsage(bus, 60, retry_delay=3600.0, senders=2, flush_timeout=0.5)
    usage.start()
    try:
        usage.record_later(finished(1))
        wait_for(lambda: bus.tries("run_1:container_run_finished"))
        bus.hold.add("run_1:container_run_finished")  # its retry, sent during the flush, gets no reply either
        senders = list(usage._threads)
        with Changes(counted, "bus_containers_usage_records_lost_total", "reason", ["shutdown"]) as lost:
            usage.stop()
        # The retry sent during the flush waited only what was left of the flush, not 60 s.
        first, retry = bus.tries("run_1:container_run_finished")
        assert first == 60 and 0 < retry <= 0.5
        assert lost.delta == {"shutdown": 1}
        assert not [t for t in senders if t.is_alive()]  # nothing keeps sending once stop() returned
    finally:
        bus.released.set()


# The usage outbox (README, "Usage and billing"): pending records kept in the shared store until confirmed.

class Clock:
    def __init__(self, now=100.0):
        self.now = now

    def __call__(self):
        return self.now


class UnreachableOutbox(MemoryStore):
    def outbox_put(self, event_id, record, lease):
        raise StateUnavailable()


def outbox_usage(bus, store, **kwargs):
    usage = EventsUsage(bus, 30, outbox=store, **kwargs)
    usage.OUTBOX_EVERY = 3600.0  # no renewal or take unless a test asks for them
    return usage


def test_a_pending_record_is_kept_in_the_outbox_until_it_is_confirmed():
    clock = Clock()
    store = MemoryStore(clock=clock)
    bus = ScriptedBus(hold={EVENT["event_id"]})
    usage = outbox_usage(bus, store, retry_delay=0.01, senders=1)
    usage.start()
    try:
        usage.record_later(EVENT)
        wait_for(lambda: bus.tries(EVENT["event_id"]))
        clock.now += EventsUsage.OUTBOX_LEASE  # its lease passed: another process could take it now
        assert store.outbox_take(10, 60) == [EVENT]
        bus.hold.clear()
        bus.released.set()  # the retry is confirmed
        wait_for(lambda: bus.recorded == [EVENT["event_id"]])
    finally:
        bus.released.set()
        usage.stop()  # the sender has finished with it
    clock.now += 61  # past the test's own take too
    assert store.outbox_take(10, 60) == []  # confirmed: gone from the outbox


def test_a_record_given_up_is_left_in_the_outbox_not_lost(counted):
    clock = Clock()
    store = MemoryStore(clock=clock)
    bus = FailingBus()
    usage = outbox_usage(bus, store, retry_delay=0.001, senders=1)
    with Changes(counted, "bus_containers_usage_records_lost_total", "reason", ["attempts", "shutdown"]) as lost:
        usage.start()
        usage.record_later(EVENT)
        wait_for(lambda: bus.attempts == EventsUsage.ATTEMPTS)
        usage.stop()
    assert lost.delta == {}
    clock.now += EventsUsage.OUTBOX_LEASE
    assert store.outbox_take(10, 60) == [EVENT]


def test_records_still_queued_at_shutdown_are_left_in_the_outbox_not_lost(counted):
    store = MemoryStore()
    usage = outbox_usage(FailingBus(), store, flush_timeout=0)
    with Changes(counted, "bus_containers_usage_records_lost_total", "reason", ["shutdown"]) as lost:
        usage.record_later(EVENT)  # never started: it stays queued
        usage.stop()
    assert lost.delta == {}


def test_without_a_reachable_outbox_a_record_is_still_sent_and_given_up_in_this_process(counted):
    bus = ScriptedBus()
    usage = outbox_usage(bus, UnreachableOutbox(), senders=1)
    usage.start()
    try:
        usage.record_later(EVENT)
        wait_for(lambda: bus.recorded == [EVENT["event_id"]])
    finally:
        usage.stop()
    usage = outbox_usage(FailingBus(), UnreachableOutbox(), retry_delay=0.001, senders=1)
    with Changes(counted, "bus_containers_usage_records_lost_total", "reason", ["attempts"]) as lost:
        usage.start()
        usage.record_later(EVENT)
        wait_for(lambda: counted("bus_containers_usage_records_lost_total", reason="attempts")
                 > lost.before["attempts"])
        usage.stop()
    assert lost.delta == {"attempts": 1}


def test_a_record_another_process_left_in_the_outbox_is_taken_and_sent_once():
    clock = Clock()
    store = MemoryStore(clock=clock)
    store.outbox_put(EVENT["event_id"], EVENT, 1)  # held by a process that died
    clock.now += 2
    bus = ScriptedBus()
    usage = EventsUsage(bus, 30, outbox=store, senders=1)
    usage.OUTBOX_EVERY = 0.02
    usage.start()
    try:
        wait_for(lambda: bus.recorded == [EVENT["event_id"]])
    finally:
        usage.stop()
    clock.now += 61
    assert store.outbox_take(10, 60) == []  # confirmed: gone from the outbox
    assert bus.recorded == [EVENT["event_id"]]


def test_a_usage_record_has_the_contracts_fields():
    """§6: event_type, event_id stable per run and type, the caller's account, occurred_at (UTC), data."""
    run = RunRequest(run_id="run_7", owner_account_id="acct-a", command=["true"], profile="codex")
    before = datetime.now(timezone.utc)
    event = usage_event("container_run_finished", run, {"exit_code": 3})
    after = datetime.now(timezone.utc)
    occurred = event.pop("occurred_at")
    assert event == {"event_type": "container_run_finished", "event_id": "run_7:container_run_finished",
                     "account_id": "acct-a", "data": {"run_id": "run_7", "image": "profile:codex", "exit_code": 3}}
    assert occurred.endswith("Z")
    assert before - timedelta(milliseconds=1) <= datetime.fromisoformat(occurred[:-1] + "+00:00") <= after


def test_a_record_before_a_run_waits_the_request_timeout():
    bus = ScriptedBus()
    EventsUsage(bus, 7).record(EVENT)
    assert bus.tries(EVENT["event_id"]) == [7]


class RecordingOutbox(MemoryStore):
    """The in-process store, recording each renewal; `away` renewals in a row fail first (the store is down)."""

    def __init__(self, clock, away=0):
        super().__init__(clock=clock)
        self.holds = []
        self.away = away

    def outbox_hold(self, event_ids, lease):
        if self.away > 0:
            self.away -= 1
            raise StateUnavailable()
        self.holds.append(set(event_ids))
        super().outbox_hold(event_ids, lease)


def test_records_pending_here_are_renewed_so_no_other_process_takes_them():
    clock = Clock()
    store = RecordingOutbox(clock)
    sending, waiting = finished(1), finished(2)
    bus = ScriptedBus(refuse={waiting["event_id"]: 1}, hold={sending["event_id"]})
    usage = EventsUsage(bus, 30, outbox=store, retry_delay=3600.0, senders=2)
    usage.OUTBOX_EVERY = 0.02
    usage.start()
    try:
        usage.record_later(sending)  # waits for its reply
        usage.record_later(waiting)  # refused once: waits out its backoff
        wait_for(lambda: bus.tries(sending["event_id"]) and bus.tries(waiting["event_id"]))
        wait_for(lambda: any({sending["event_id"], waiting["event_id"]} <= held for held in store.holds))
        clock.now += EventsUsage.OUTBOX_LEASE - 1
        assert store.outbox_take(10, 60) == []  # renewed: not another process's to take
    finally:
        bus.hold.clear()
        bus.released.set()
        usage.stop()


def test_the_outbox_renewals_carry_on_after_the_store_was_away():
    store = RecordingOutbox(Clock(), away=3)
    bus = ScriptedBus(hold={EVENT["event_id"]})
    usage = EventsUsage(bus, 30, outbox=store, senders=1)
    usage.OUTBOX_EVERY = 0.02
    usage.start()
    try:
        usage.record_later(EVENT)
        wait_for(lambda: any(EVENT["event_id"] in held for held in store.holds))
        assert store.away == 0
    finally:
        bus.hold.clear()
        bus.released.set()
        usage.stop()


def test_a_record_taken_from_the_outbox_gets_every_attempt_and_stays_there_when_they_fail(counted):
    clock = Clock()
    store = MemoryStore(clock=clock)
    store.outbox_put(EVENT["event_id"], EVENT, 1)  # held by a process that died
    clock.now += 2
    bus = FailingBus()
    usage = EventsUsage(bus, 30, outbox=store, retry_delay=0.001, senders=1)
    usage.OUTBOX_EVERY = 0.02
    with Changes(counted, "bus_containers_usage_records_lost_total", "reason", ["attempts", "shutdown"]) as lost:
        usage.start()
        wait_for(lambda: bus.attempts == EventsUsage.ATTEMPTS)
        usage.stop()
    assert bus.attempts == EventsUsage.ATTEMPTS and lost.delta == {}
    clock.now += EventsUsage.OUTBOX_LEASE
    assert store.outbox_take(10, 60) == [EVENT]  # left for whoever asks next


def test_a_stopping_process_takes_nothing_more_from_the_outbox():
    clock = Clock()
    store = MemoryStore(clock=clock)
    abandoned = finished(9)
    store.outbox_put(abandoned["event_id"], abandoned, 5)  # its holder dies; the lease ends at 105
    bus = ScriptedBus(hold={EVENT["event_id"]})
    usage = EventsUsage(bus, 30, outbox=store, senders=1, flush_timeout=0.5)
    usage.OUTBOX_EVERY = 0.02
    usage.start()
    usage.record_later(EVENT)  # keeps the flush busy for its whole 0.5 s
    wait_for(lambda: bus.tries(EVENT["event_id"]))
    errors = []

    def stop():
        try:
            usage.stop()
        except Exception as exc:  # reported below, as the test's failure
            errors.append(exc)

    stopping = threading.Thread(target=stop)
    stopping.start()
    try:
        wait_for(lambda: usage._flush_by is not None)
        clock.now += 10  # the abandoned record is due now, while this process flushes
        stopping.join(10)  # the flush is 0.5 s; the request in flight would wait 30 s
        assert not stopping.is_alive() and errors == []
        # Still due for the next process: the stopping one neither took nor sent it.
        assert store.outbox_take(10, 60) == [abandoned]
        assert abandoned["event_id"] not in [e for e, _ in bus.timeouts]
    finally:
        bus.released.set()
        stopping.join(10)


def test_a_denial_sent_as_an_error_envelope_keeps_its_action_and_command():
    """§6: the 402 carries the integration's action and command, however the denial was sent."""
    envelope = {"error": {"type": "billing_required", "message": "no plan", "action": "setup_billing_v2",
                          "command": "bus billing setup --plan containers"}}
    with pytest.raises(BillingRequired) as raised:
        EventsBilling(AnsweringBus(envelope), 1).check("acct-a")
    assert raised.value.action == "setup_billing_v2"
    assert raised.value.command == "bus billing setup --plan containers"
    assert raised.value.details == {"reason": "billing_required"}


def test_records_pending_count_both_queued_and_in_flight(counted):
    bus = ScriptedBus(hold={"run_1:container_run_finished", "run_2:container_run_finished"})
    usage = EventsUsage(bus, 30, senders=1)
    usage.start()
    try:
        usage.record_later(finished(1))
        wait_for(lambda: bus.tries("run_1:container_run_finished"))  # in flight
        usage.record_later(finished(2))  # queued behind it
        assert counted("bus_containers_usage_records_pending") == 2
    finally:
        bus.hold.clear()
        bus.released.set()
        usage.stop()
