"""The counters of the run controls, billing and usage (README, "Metrics"), recorded in this process.

tests/test_metrics.py reads them summed over gunicorn workers; here the same calls record into
prometheus_client's in-process registry, so each refusal is seen to count under its own label.
"""
import pytest
from prometheus_client import REGISTRY

from bus_containers_provider import metrics
from bus_containers_provider.billing import EventsBilling
from bus_containers_provider.controls import Capacity, RunControls, never
from bus_containers_provider.errors import BillingRequired, Conflict, IdempotencyKeyReused, TooManyRuns, Unavailable
from bus_containers_provider.state.memory import MemoryStore
from bus_containers_provider.usage import EventsUsage
from conftest import AnsweringBus
from test_records import EVENT, FailingBus, wait_for
from test_run_controls import Interleaved, first_and_retry

pytestmark = pytest.mark.timeout(30)

REJECTIONS = "bus_containers_run_rejections_total"
DENIALS = "bus_containers_billing_denials_total"
LOST = "bus_containers_usage_records_lost_total"
PENDING = "bus_containers_usage_records_pending"


@pytest.fixture
def counted(monkeypatch):
    """Metrics on in this process (as --metrics-addr turns them on in a worker); a reader of one sample."""
    from bus_containers_provider.metrics import series

    monkeypatch.setattr(metrics, "_series", series)

    def value(name, **labels):
        return REGISTRY.get_sample_value(name, labels) or 0.0

    return value


class Changes:
    """The change of every labelled sample of `name` across a block."""

    def __init__(self, value, name, label, values):
        self.value, self.name, self.label, self.values = value, name, label, values

    def __enter__(self):
        self.before = self.read()
        return self

    def __exit__(self, *exc):
        after = self.read()
        self.delta = {k: after[k] - self.before[k] for k in after if after[k] != self.before[k]}

    def read(self):
        return {v: self.value(self.name, **{self.label: v}) for v in self.values}


def rejections(counted):
    return Changes(counted, REJECTIONS, "reason",
                   ["too_many_runs", "conflict", "idempotency_key_reused", "capacity", "other"])


def controls(store=None, limit=0):
    return RunControls(store or MemoryStore(), max_runs_per_account=limit, run_capacity=4, idempotency_ttl=60)


@pytest.mark.parametrize("reply,action", [
    ({"allowed": False, "reason": "billing_required"}, "setup_billing"),
    ({"allowed": False, "reason": "quota_exceeded"}, "upgrade_plan"),
    ({"allowed": False, "action": "call_sales"}, "other"),
])
def test_a_billing_denial_counts_under_its_action(counted, reply, action):
    with Changes(counted, DENIALS, "action", ["setup_billing", "upgrade_plan", "other"]) as changes:
        with pytest.raises(BillingRequired):
            EventsBilling(AnsweringBus({"payload": reply}), 1).check("acct-a")
    assert changes.delta == {action: 1}


def test_a_key_reused_with_another_body_counts_as_idempotency_key_reused(counted):
    runs = controls()
    runs.claim("acct-a", "k", "fp", "run_1")
    with rejections(counted) as changes, pytest.raises(IdempotencyKeyReused):
        runs.claim("acct-a", "k", "other-body", "run_2")
    assert changes.delta == {"idempotency_key_reused": 1}


def test_a_retry_that_finds_the_key_taken_by_another_body_counts_as_idempotency_key_reused(counted):
    store = Interleaved()
    runs = controls(store)
    _, retry = first_and_retry(runs)
    store.meanwhile = lambda s, scope: (s._keys.clear(), s.claim_key(scope, "other-body", "run_3", 30))
    with rejections(counted) as changes, pytest.raises(IdempotencyKeyReused):
        runs.join(retry, "fp", "run_2", wait=5, gone=never)
    assert changes.delta == {"idempotency_key_reused": 1}


def test_a_retry_that_cannot_wait_counts_as_conflict(counted):
    runs = controls()
    _, retry = first_and_retry(runs)
    with rejections(counted) as changes, pytest.raises(Conflict):
        runs.join(retry, "fp", "run_2", wait=0, gone=never)
    assert changes.delta == {"conflict": 1}


def test_a_full_account_counts_as_too_many_runs(counted):
    runs = controls(limit=1)
    with runs.slot("acct-a", "run_1"):
        with rejections(counted) as changes, pytest.raises(TooManyRuns):
            with runs.slot("acct-a", "run_2"):
                pass
    assert changes.delta == {"too_many_runs": 1}


@pytest.mark.parametrize("refusal,reason", [(None, "capacity"), (Conflict(), "conflict")])
def test_a_full_capacity_counts_as_capacity_or_as_the_retrys_conflict(counted, refusal, reason):
    capacity = Capacity(1)
    with capacity.hold():
        with rejections(counted) as changes, pytest.raises(Unavailable if refusal is None else Conflict):
            with capacity.hold(refusal):
                pass
    assert changes.delta == {reason: 1}


def lost(counted):
    return Changes(counted, LOST, "reason", ["attempts", "backlog_full", "shutdown"])


def test_a_record_given_up_after_its_attempts_counts_as_lost_attempts(counted):
    usage = EventsUsage(FailingBus(), 1, retry_delay=0.001, senders=1)
    with lost(counted) as changes:
        usage.start()
        usage.record_later(EVENT)
        wait_for(lambda: counted(LOST, reason="attempts") - changes.before["attempts"] == 1)
        usage.stop()
    assert changes.delta == {"attempts": 1}
    assert counted(PENDING) == 0


def test_a_record_over_the_backlog_counts_as_lost_backlog_full_and_the_rest_at_shutdown(counted):
    usage = EventsUsage(FailingBus(), 1, flush_timeout=0)
    usage.BACKLOG = 2  # never started: records stay queued
    with lost(counted) as changes:
        for n in range(3):
            usage.record_later(dict(EVENT, event_id=f"run_{n}:finished", data={"run_id": f"run_{n}"}))
        assert counted(PENDING) == 2
        usage.stop()
    assert changes.delta == {"backlog_full": 1, "shutdown": 2}
    assert counted(PENDING) == 0
