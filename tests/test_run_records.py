"""Run records as units (CONTRACT §9): completion once, by whichever process holds the record;
adoption by correlation id without a second publish; deadlines; cancels; a store that is away."""
import threading
import time

import pytest

from bus_containers_provider import records as records_module
from bus_containers_provider.backends import RunRequest
from bus_containers_provider.config import Settings
from bus_containers_provider.controls import Key, RunControls
from bus_containers_provider.errors import RunCancelled, StateUnavailable, Unavailable
from bus_containers_provider.records import RunRecords
from bus_containers_provider.state.base import FINISHED, RUNNING
from bus_containers_provider.state.memory import MemoryStore
from bus_containers_provider.usage import MemoryUsage

pytestmark = pytest.mark.timeout(30)

SETTINGS = Settings(jwt_secret=b"x" * 32, run_timeout_grace=1.0, max_output_bytes=64)


class Backend:
    """A backend whose replies the test hands over, one per correlation id, as a listener thread would."""

    def __init__(self):
        self.started, self.adopted, self.cancelled, self.released = [], [], [], []
        self.waiting = {}
        self.watched = {}
        self.fail_start = None

    def start(self, run, correlation_id, on_reply):
        if self.fail_start:
            raise self.fail_start
        self.started.append((run.run_id, correlation_id))
        self.waiting[correlation_id] = on_reply
        return correlation_id

    def adopt(self, correlation_id, on_reply):
        self.adopted.append(correlation_id)
        self.waiting[correlation_id] = on_reply
        return correlation_id

    def reply(self, correlation_id, **fields):
        self.waiting.pop(correlation_id)(fields, None)

    def result(self, reply, run_id):
        return dict({"run_id": run_id, "owner_account_id": "acct-a", "runner_name": "r", "image": "alpine",
                     "args": ["x"], "exit_code": 0, "stdout": "ok", "stderr": "", "duration_ms": 5,
                     "runtime": {"state": "ready", "provider": "p"}}, **reply)

    def watch(self, handle, cancelled):
        self.watched[handle] = cancelled
        threading.Thread(target=self._watch, args=(handle,), daemon=True).start()

    def _watch(self, handle):
        while handle in self.watched:
            if self.watched[handle]():
                on_reply = self.waiting.pop(handle, None)
                if on_reply is not None:
                    on_reply(None, RunCancelled(self.watched[handle]()))
                return
            time.sleep(0.01)

    def unwatch(self, handle):
        self.watched.pop(handle, None)

    def release(self, handle):
        self.released.append(handle)

    def can_adopt(self):
        return True

    def cancel(self, run):
        self.cancelled.append(run.run_id)


class Process:
    """One provider process's records over a store that may be shared with other processes."""

    def __init__(self, store, backend=None, limit=2):
        self.store = store
        self.backend = backend or Backend()
        self.usage = MemoryUsage()
        self.controls = RunControls(store, max_runs_per_account=limit, run_capacity=4, idempotency_ttl=60)
        self.records = RunRecords(store, self.backend, self.usage, self.controls, SETTINGS)

    def open(self, run_id="run_1", detached=True, timeout_seconds=30, key=Key()):
        self.controls.take_slot("acct-a", run_id)
        run = RunRequest(run_id=run_id, owner_account_id="acct-a", command=["x"], image="alpine",
                         timeout_seconds=timeout_seconds, env={"SECRET": "s"}, stdin="also secret")
        return self.records.open(run, key, detached=detached)

    def usage_of(self, run_id):
        return sorted(r["event_type"] for r in self.usage.records if r["data"]["run_id"] == run_id)


def wait_until(condition, timeout=5.0, what="condition"):
    """Poll `condition`, bounded; its first true value."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"{what} not reached within {timeout}s"
        time.sleep(0.02)
    return value


def finished(store, run_id="run_1"):
    record = store.read_run(run_id)
    return record if record is not None and record["state"] == FINISHED else None


def test_a_detached_run_is_completed_when_its_reply_comes():
    here = Process(MemoryStore())
    live = here.open()
    [(_, correlation_id)] = here.backend.started
    assert here.store.read_run("run_1")["state"] == RUNNING
    here.backend.reply(correlation_id, stdout="x" * 100)
    record = wait_until(lambda: finished(here.store), timeout=5, what="the record finished")
    assert record["answer"]["status"] == 200
    assert record["answer"]["body"]["stdout"] == "x" * 64 and record["answer"]["body"]["stdout_truncated"]
    assert live.done.is_set() and live.answer.body == record["answer"]["body"]
    assert here.usage_of("run_1") == ["container_run_finished"]
    assert here.store.acquire_slot("acct-a", "run_9", 1, 30) == (True, 1)  # the account's slot was freed
    assert here.records.in_flight() == 0


def test_a_record_keeps_neither_env_nor_stdin():
    here = Process(MemoryStore())
    here.open()
    kept = repr(here.store.read_run("run_1"))
    assert "SECRET" not in kept and "secret" not in kept


def test_a_foreground_run_is_answered_from_its_reply():
    here = Process(MemoryStore())
    live = here.open(detached=False)
    [(_, correlation_id)] = here.backend.started
    threading.Timer(0.05, here.backend.reply, args=(correlation_id,), kwargs={"exit_code": 3}).start()
    answer = here.records.wait(live)
    assert answer.status == 200 and answer.body["status"] == "failed" and answer.body["exit_code"] == 3
    assert finished(here.store)["answer"]["body"] == answer.body


def test_two_processes_completing_one_run_complete_it_once():
    store = MemoryStore()
    first, second = Process(store), Process(store)
    first.open()
    [(_, correlation_id)] = first.backend.started
    # The second process holds it too (the first's lease lapsed while it was alive): both get the reply.
    store.hold_runs(["run_1"], 0)
    assert second.records._adopt() is True
    first.backend.reply(correlation_id, stdout="one")
    second.backend.reply(correlation_id, stdout="two")
    record = wait_until(lambda: finished(store), timeout=5, what="the record finished")
    wait_until(lambda: first.records.in_flight() == second.records.in_flight() == 0, timeout=5,
               what="both processes done with it")
    assert first.usage_of("run_1") + second.usage_of("run_1") == ["container_run_finished"]
    assert record["answer"]["body"]["stdout"] in ("one", "two")


def test_an_orphaned_record_is_adopted_by_its_correlation_id_and_never_published_again(monkeypatch, counted):
    monkeypatch.setattr(records_module, "LEASE_SECONDS", 0.2)
    adopted = counted("bus_containers_runs_adopted_total")
    store = MemoryStore()
    dead, alive = Process(store), Process(store)
    dead.open()  # this process dies now: it renews nothing from here on
    [(_, correlation_id)] = dead.backend.started
    assert alive.records._adopt() is False  # its lease has not passed yet
    wait_until(lambda: alive.records._adopt(), timeout=5, what="the record adopted")
    assert alive.backend.adopted == [correlation_id] and alive.backend.started == []
    alive.backend.reply(correlation_id)
    record = wait_until(lambda: finished(store), timeout=5, what="the adopted record finished")
    assert record["answer"]["body"]["run_id"] == "run_1"
    assert alive.usage_of("run_1") == ["container_run_finished"] and dead.usage_of("run_1") == []
    assert store.acquire_slot("acct-a", "run_9", 1, 30) == (True, 1)
    assert counted("bus_containers_runs_adopted_total") == adopted + 1


def test_a_record_whose_deadline_passes_finishes_with_the_503():
    here = Process(MemoryStore())
    live = here.open(timeout_seconds=0)
    live.record["deadline"] = time.time() - 1  # as if its run wait were over
    here.records._track(live)
    here.records._expire()
    record = finished(here.store)
    assert record["answer"]["status"] == 503
    error = record["answer"]["body"]["error"]
    assert error["type"] == "unavailable" and error["details"] == {"run_id": "run_1"}
    assert record["answer"]["headers"]["Retry-After"] == "1"
    [failed] = [r for r in here.usage.records if r["event_type"] == "container_run_failed"]
    assert failed["data"]["reason"] == "unavailable"
    assert here.store.acquire_slot("acct-a", "run_9", 1, 30) == (True, 1)


def test_a_caller_gone_cancels_the_run_and_frees_its_key_for_a_retry():
    here = Process(MemoryStore())
    key = here.controls.claim("acct-a", "k", "fp", "run_1")
    live = here.open(detached=False, key=key)
    answer = here.records.wait(live, gone=lambda: "the caller went away")
    assert answer.status == 503 and answer.body["error"]["details"] == {"run_id": "run_1"}
    assert here.backend.cancelled == ["run_1"]
    assert here.store.read_run("run_1") is None and here.records.read("run_1") is None
    # Not the user's choice: the same key runs again.
    assert here.controls.claim("acct-a", "k", "fp", "run_2").new
    [failed] = [r for r in here.usage.records if r["event_type"] == "container_run_failed"]
    assert failed["data"]["reason"] == "cancelled"


def test_a_cancel_elsewhere_reaches_the_holders_waiters_at_its_next_renewal():
    store = MemoryStore()
    holder, other = Process(store), Process(store)
    live = holder.open()
    answer = other.records.cancel(store.read_run("run_1"))
    assert answer.body["status"] == "cancelled" and other.backend.cancelled == ["run_1"]
    assert not live.done.is_set()
    holder.records._renew()
    assert live.done.is_set() and live.answer.body["status"] == "cancelled"
    assert holder.records.in_flight() == 0
    assert holder.usage_of("run_1") == [] and other.usage_of("run_1") == ["container_run_failed"]


def test_a_deleted_run_is_forgotten_but_kept_for_its_keys_retries():
    here = Process(MemoryStore())
    key = here.controls.claim("acct-a", "k", "fp", "run_1")
    here.open(key=key)
    answer = here.records.cancel(here.store.read_run("run_1"))
    body = answer.body
    assert body["status"] == "cancelled" and body["exit_code"] is None and body["runner_name"] is None
    assert body["runtime"] is None and body["stdout"] == "" and not body["stdout_truncated"]
    assert here.records.read("run_1") is None  # a GET is a 404
    assert here.store.read_run("run_1")["answer"]["body"] == body  # a retry with the key is answered
    assert here.controls.claim("acct-a", "k", "fp", "run_2").bound == "run_1"


class Flaky(MemoryStore):
    def __init__(self):
        super().__init__()
        self.down = False

    def finish_run(self, *args, **kwargs):
        if self.down:
            raise StateUnavailable()
        return super().finish_run(*args, **kwargs)


def test_a_store_away_at_completion_answers_the_caller_and_stores_the_answer_later():
    store = Flaky()
    here = Process(store)
    live = here.open(detached=False)
    [(_, correlation_id)] = here.backend.started
    store.down = True
    here.backend.reply(correlation_id)
    answer = here.records.wait(live)
    assert answer.status == 200 and store.read_run("run_1")["state"] == RUNNING
    assert here.usage_of("run_1") == []  # billed once the store has the answer, not before
    store.down = False
    here.records._store_unstored()
    assert finished(store)["answer"]["body"] == answer.body
    assert here.usage_of("run_1") == ["container_run_finished"]


def test_a_run_that_could_not_be_handed_over_leaves_no_record():
    here = Process(MemoryStore())
    here.backend.fail_start = Unavailable("the Events API is down")
    with pytest.raises(Unavailable):
        here.open()
    assert here.store.read_run("run_1") is None and here.records.in_flight() == 0


def test_a_wait_for_a_record_held_elsewhere_reads_the_store_until_it_finishes():
    store = MemoryStore()
    holder, reader = Process(store), Process(store)
    holder.open()
    [(_, correlation_id)] = holder.backend.started
    threading.Timer(0.2, holder.backend.reply, args=(correlation_id,)).start()
    record = reader.records.await_finished("run_1", 10)
    assert record["state"] == FINISHED and reader.backend.adopted == []


def test_a_wait_that_runs_out_returns_the_record_still_running():
    here = Process(MemoryStore())
    here.open()
    assert here.records.await_finished("run_1", 0.1)["state"] == RUNNING


def test_stopping_with_a_shared_store_hands_running_records_over_at_once():
    store = MemoryStore()
    leaving, staying = Process(store), Process(store)
    leaving.open()
    leaving.records.stop(hand_over=True)
    assert staying.records._adopt() is True and staying.records.in_flight() == 1


def test_a_wait_without_run_capacity_is_answered_at_once_never_refused():
    from bus_containers_provider import create_app
    from conftest import bearer, env

    app = create_app(dict(env(), BUS_CONTAINERS_THREADS="4"))
    provider = app.extensions["bus_containers"]
    client = app.test_client()
    live = Process(provider.records.store).open()  # a running record of acct-a, held by another process
    provider.controls.capacity.in_use = provider.controls.capacity.size  # every run place taken
    answered = client.get(f"/api/v1/containers/runs/{live.run_id}", headers=dict(bearer("acct-a"), Prefer="wait=30"))
    assert answered.status_code == 200 and answered.get_json()["state"] == "running"
    assert "Preference-Applied" not in answered.headers and answered.headers["Retry-After"] == "2"
    provider.controls.capacity.in_use = 0
    waited = client.get(f"/api/v1/containers/runs/{live.run_id}", headers=dict(bearer("acct-a"), Prefer="wait=1"))
    assert waited.headers["Preference-Applied"] == "wait=1" and waited.get_json()["state"] == "running"


class OutboxUsage(MemoryUsage):
    """A usage backend that keeps records in the shared outbox; this process dies before sending any."""

    outbox_lease = 0.001

    def record_kept(self, event):
        return None  # killed here: nothing sent from this process


def test_a_finished_runs_usage_record_outlives_the_process_that_finished_it():
    here = Process(MemoryStore())
    here.usage = here.records._usage = OutboxUsage()
    here.open()
    [(_, correlation_id)] = here.backend.started
    here.backend.reply(correlation_id)
    wait_until(lambda: finished(here.store), what="the record finished")
    taken = wait_until(lambda: here.store.outbox_take(10, 60), what="the usage record taken from the outbox")
    assert [(e["event_type"], e["data"]["run_id"]) for e in taken] == [("container_run_finished", "run_1")]


class Unreachable(MemoryStore):
    down = False

    def read_run(self, run_id):
        if self.down:
            raise StateUnavailable()
        return super().read_run(run_id)


def test_while_the_store_is_away_a_read_of_a_run_held_here_is_answered_from_it():
    from bus_containers_provider import create_app
    from conftest import bearer, env

    app = create_app(env())
    provider = app.extensions["bus_containers"]
    store = Unreachable()
    provider.records = RunRecords(store, Backend(), MemoryUsage(), provider.controls, SETTINGS)
    live = provider.records.open(RunRequest(run_id="run_1", owner_account_id="acct-a", command=["x"],
                                            image="alpine"), Key(), detached=True)
    store.down = True
    read = app.test_client().get("/api/v1/containers/runs/run_1", headers=bearer("acct-a"))
    assert read.status_code == 200 and read.get_json()["state"] == "running"
    assert live.run_id == "run_1"


def test_stopping_with_a_shared_store_leaves_a_waiting_foreground_run_to_another_process():
    store = MemoryStore()
    leaving, staying = Process(store), Process(store)
    key = leaving.controls.claim("acct-a", "k", "fp", "run_1")
    live = leaving.open(detached=False, key=key)
    leaving.records.hand_over_waits.set()  # the shutdown grace is over (Provider.drain, with --state-url)
    answer = leaving.records.wait(live, gone=lambda: "the provider is shutting down")
    assert answer.status == 503 and answer.body["error"]["details"] == {"run_id": "run_1"}
    # Not cancelled: no delete request, no usage record, the key still names the run, and it is adoptable now.
    assert leaving.backend.cancelled == [] and leaving.usage.records == []
    assert leaving.controls.claim("acct-a", "k", "fp", "run_2").bound == "run_1"
    assert staying.records._adopt() is True and staying.backend.adopted == [live.record["correlation_id"]]
