"""Run records (CONTRACT §9): the one owner of a handed-over run's life, completed once, by any process.

A record is made before its run request is published and leased by the
process that publishes it. Completing it — storing the answer, the usage
record, freeing the account slot, waking whoever waits — happens once, in
whichever process holds it when the reply comes or the deadline passes; the
store's finish is the single point that decides who that is. A record whose
holder went silent is adopted by the next process that looks: it waits for
the original correlation id and never publishes the run again.
"""
import heapq
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Dict, Optional

from . import metrics
from .backends.base import RunRequest, check_owner
from .controls import LEASE_SECONDS, RENEW_SECONDS, never
from .errors import ProviderError, RunCancelled, StateUnavailable, Unavailable, error_body
from .results import CANCELLED, ERROR, settle
from .schemas import run_answer_schema
from .state.base import FINISHED, RUNNING
from .usage import FAILED, FINISHED as RUN_FINISHED, usage_event

log = logging.getLogger(__name__)

# How often the keeper looks for records nobody holds, and for deadlines passed.
ADOPT_EVERY = 5.0
TICK = 1.0
ADOPT_BATCH = 100
# Retry-After (seconds) on a running item: a polling hint.
POLL_HINT = 2
# A wait for a record held elsewhere reads it this often (backing off to the longest).
READ_POLL = (0.05, 1.0)
# How long a stopping process waits for a run being cancelled by another thread.
CANCEL_WAIT = 5.0
# Threads that complete records without a caller waiting (their replies come on a listener thread).
COMPLETERS = 4


@dataclass(frozen=True)
class Answer:
    """A run's answer as sent: what its record keeps and a retried Idempotency-Key replays."""

    status: int
    body: dict
    headers: dict = field(default_factory=dict)
    replayed: bool = False

    def stored(self) -> dict:
        return {"status": self.status, "body": self.body, "headers": self.headers}

    @classmethod
    def of(cls, stored: dict, replayed: bool = False) -> "Answer":
        return cls(stored["status"], stored["body"], dict(stored.get("headers") or {}), replayed=replayed)

    @classmethod
    def of_error(cls, error: ProviderError, run_id: str) -> "Answer":
        """A delegated run's error, naming the run so the caller can read it later."""
        details = dict(error.details or {}, run_id=run_id)
        body = error_body(error.type, error.message, action=error.action, command=error.command, details=details)
        headers = {k: v for k, v in error.headers.items() if k == "Retry-After"}
        return cls(error.status, body, headers)


def item(record: dict) -> dict:
    """A record as the caller reads it: id, state, owner, and its result or error once finished."""
    shown = {"id": record["run_id"], "state": record["state"], "owner_account_id": record["owner_account_id"],
             "details": {"image": run_of(record).image_label}}
    answer = record.get("answer")
    if answer is not None and answer["status"] == 200:
        shown["result"] = answer["body"]
        shown["details"]["exit_code"] = answer["body"]["exit_code"]
    elif answer is not None:
        shown["error"] = answer["body"]["error"]
    return shown


def run_of(record: dict) -> RunRequest:
    """The run a record names (without env and stdin, which no record keeps)."""
    return RunRequest(run_id=record["run_id"], owner_account_id=record["owner_account_id"],
                      command=record["args"], profile=record.get("profile"), image=record.get("image"),
                      timeout_seconds=record.get("timeout_seconds"))


def cancelled_answer(record: dict, now: float) -> Answer:
    """The result of a run cancelled before any reply completed it (§9)."""
    result = {
        "run_id": record["run_id"], "owner_account_id": record["owner_account_id"], "runner_name": None,
        "image": run_of(record).image_label, "args": record["args"], "exit_code": None, "stdout": "", "stderr": "",
        "duration_ms": max(0, int((now - record["created"]) * 1000)), "runtime": None, "status": CANCELLED,
        "stdout_truncated": False, "stderr_truncated": False,
    }
    return Answer(200, result)


@dataclass(eq=False)
class Live:
    """A record this process holds: the wait for its reply, and who is told when it finishes."""

    record: dict
    attached: bool  # a request thread waits for it and completes it itself
    adopted: bool = False
    handle: object = None  # the backend's wait for the reply
    reply: Optional[tuple] = None  # (reply, error) once it came
    replied: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    answer: Optional[Answer] = None
    finishing: bool = False
    cancelling: bool = False
    counted: bool = False  # in this process's in-flight metrics
    unstored: Optional[tuple] = None  # (usage type, data, forget): answered, not yet taken by the store

    @property
    def run_id(self) -> str:
        return self.record["run_id"]


class RunRecords:
    """This process's side of the run records: hand over, wait, complete, cancel, adopt."""

    def __init__(self, store, backend, usage, controls, settings):
        self.store = store
        self.backend = backend
        self._usage = usage
        self._controls = controls
        self._settings = settings
        self._lock = threading.Lock()
        self._live: Dict[str, Live] = {}
        self._deadlines = []  # heap of (deadline, run_id) of records no request thread waits for
        self._stopping = threading.Event()
        # Set when the shutdown grace ends with a shared store: a foreground wait that ends then leaves its
        # run to another process instead of cancelling it (its retry or a read gets the result).
        self.hand_over_waits = threading.Event()
        self._thread = None
        self._completers = None

    # -- handing a run over ------------------------------------------------

    def open(self, run: RunRequest, key, *, detached: bool) -> Live:
        """Make the run's record, point its key at it, and publish the run request.

        Before the publish returns the run may already have replied. A publish
        that fails leaves nothing behind (the caller frees the slot and key):
        a run that was never handed over may run again.
        """
        now = time.time()
        record = {
            "state": RUNNING, "run_id": run.run_id, "owner_account_id": run.owner_account_id,
            "correlation_id": str(uuid.uuid4()), "created": now,
            "deadline": now + self._settings.run_wait(run.timeout_seconds), "detached": detached,
            "args": list(run.command), "key": key.scope,
            **{k: getattr(run, k) for k in ("profile", "image", "timeout_seconds") if getattr(run, k) is not None},
        }
        self.store.put_run(record, LEASE_SECONDS, record["deadline"] - now + self._keep(record["key"]))
        live = Live(record, attached=not detached)
        self._track(live)
        try:
            self._controls.bind(key, run.run_id)
            self._count(live)
            live.handle = self.backend.start(run, record["correlation_id"], partial(self._replied, live))
        except BaseException:
            self._uncount(live)
            self._untrack(live)
            try:
                self.store.drop_run(run.run_id)
            except StateUnavailable:
                log.warning("could not drop the record of run %s; it was never handed over", run.run_id)  # pragma: no mutate
            raise
        return live

    def _keep(self, key: Optional[str]) -> float:
        # A record a key points at is kept as long as the key, so a retry can still be answered.
        return max(self._settings.run_retention, self._settings.idempotency_ttl if key else 0)

    def _track(self, live: Live) -> None:
        with self._lock:
            self._live[live.run_id] = live
            if not live.attached:
                heapq.heappush(self._deadlines, (live.record["deadline"], live.run_id))

    def _untrack(self, live: Live) -> None:
        with self._lock:
            if self._live.get(live.run_id) is live:
                del self._live[live.run_id]

    def _count(self, live: Live) -> None:
        live.counted = True
        metrics.run_started(detached=not live.attached)

    def _uncount(self, live: Live, status: Optional[str] = None) -> None:
        if live.counted:
            live.counted = False
            metrics.run_ended(detached=not live.attached, status=status, adopted=live.adopted)

    # -- replies, deadlines and completion -------------------------------------

    def _replied(self, live: Live, reply, error) -> None:
        """The backend's reply (or what ended its wait): called once, often on a listener thread."""
        live.reply = (reply, error)
        live.replied.set()
        if not live.attached:
            self._completer().submit(self._complete_logged, live)

    def _complete_logged(self, live: Live) -> None:
        try:
            self._complete(live)
        except StateUnavailable as exc:
            log.warning("run %s: %s; it is completed once the store answers", live.run_id, exc)  # pragma: no mutate
        except Exception:  # a bug must not vanish into a future nobody reads
            log.exception("completing run %s failed", live.run_id)  # pragma: no mutate

    def _completer(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._completers is None:  # first used in a worker, after fork
                self._completers = ThreadPoolExecutor(COMPLETERS, thread_name_prefix="run-completer")
            return self._completers

    def wait(self, live: Live, gone: Callable[[], Optional[str]] = never) -> Answer:
        """A foreground caller's wait: the answer once the reply comes, the deadline passes or the caller goes."""
        self.backend.watch(live.handle, gone)
        try:
            live.replied.wait(max(0.0, live.record["deadline"] - time.time()))
        finally:
            self.backend.unwatch(live.handle)
        self._complete(live)
        return live.answer

    def _complete(self, live: Live) -> None:
        """Turn the reply (or its absence by the deadline) into the run's answer, and finish the record."""
        reply, error = live.reply or (None, None)
        record, now = live.record, time.time()
        if isinstance(error, RunCancelled) and self.hand_over_waits.is_set():
            self._leave(live)
            return
        if isinstance(error, RunCancelled):
            # Its caller went away or the provider is stopping: not the user's choice, so a retry with
            # its key may run it again; a caller still connected is told to retry (503).
            self._cancel(live, Answer.of_error(error, record["run_id"]), str(error), drop_key=True)
            return
        if live.reply is None:
            error = Unavailable(f"no bus.containers.run.response reply within "  # pragma: no mutate
                                f"{record['deadline'] - record['created']:g}s")
            metrics.reply_timed_out("bus.containers.run.response")
        if error is None:
            try:
                result = check_owner(self.backend.result(reply, record["run_id"]), record["owner_account_id"])
                metrics.reply_seconds("bus.containers.run.response", now - record["created"])
            except ProviderError as exc:
                error = exc
        if error is not None:
            error = error if isinstance(error, ProviderError) else Unavailable(str(error))
            self._finish(live, Answer.of_error(error, record["run_id"]), FAILED, {"reason": error.type})
            return
        result = settle(result, self._settings.max_output_bytes)
        if result["status"] == ERROR:
            # The platform failed, not the user's code: not billed as runtime.
            usage = (FAILED, {"reason": ERROR, "exit_code": result["exit_code"]})
        else:
            usage = (RUN_FINISHED, {"duration_ms": result["duration_ms"], "exit_code": result["exit_code"],
                                    "image": result["image"], "status": result["status"]})
        self._finish(live, Answer(200, run_answer_schema.dump(result)), *usage)

    def _leave(self, live: Live) -> None:
        """Stopping with a shared store: the run carries on, and another process adopts its record at once.

        Its caller, if still connected, is told so (503): a retry with its key waits for that same
        run, never a second one.
        """
        with self._lock:
            if live.finishing or live.cancelling:
                return
            live.finishing = True
        self.backend.release(live.handle)
        self._uncount(live)
        self._untrack(live)
        try:
            self.store.hold_runs([live.run_id], 0)
        except StateUnavailable:
            log.warning("run %s is adopted once its lease passes", live.run_id)  # pragma: no mutate
        log.info("run %s left for another process to finish", live.run_id)  # pragma: no mutate
        live.answer = Answer.of_error(Unavailable(
            "the provider is shutting down; the run carries on: read it, or retry with its Idempotency-Key"),
            live.run_id)
        live.done.set()

    def _cancel(self, live: Live, answer: Answer, reason: str, drop_key: bool = False) -> None:
        """Nobody will read this run's result: bill nobody for it, stop it, forget it (with `drop_key`, its key too)."""
        with self._lock:
            if live.cancelling or live.finishing:
                return  # cancelled once: one delete request, one usage record
            live.cancelling = True
        log.info("run %s cancelled: %s", live.run_id, reason)  # pragma: no mutate
        try:
            self.backend.cancel(run_of(live.record))
        except ProviderError as error:
            log.warning("the cancel request for run %s was not published: %s", live.run_id, error)
        self._finish(live, answer, FAILED, {"reason": CANCELLED}, forget=True, drop_key=drop_key)
        if drop_key and live.record.get("key"):
            self._controls.drop_key(live.record["key"], live.run_id)

    def _finish(self, live: Live, answer: Answer, usage_type: str, usage_data: dict, forget: bool = False,
                drop_key: bool = False) -> None:
        """Store the answer once; only the call that stored it records usage and frees the slot."""
        with self._lock:
            if live.finishing:
                return
            live.finishing = True
        record = live.record
        self.backend.release(live.handle)
        # The run is over: its slot goes before anyone can read it as finished, so a caller told so
        # (here or by another process) may start the next run at once.
        self._controls.release_slot(record["owner_account_id"], record["run_id"])
        usage = usage_event(usage_type, run_of(record), usage_data) if self._usage.keeps_records else None
        try:
            finished = self._store_answer(live, answer, usage, forget, drop_key)
        except StateUnavailable:
            # The caller still gets the answer; the keeper stores it once the store is back.
            log.warning("could not store the answer of run %s yet; trying again", record["run_id"])  # pragma: no mutate
            live.answer = answer
            live.unstored = (usage, forget, drop_key)
            live.done.set()
            return
        self._settled(live, answer if finished else None, usage)

    def _store_answer(self, live: Live, answer: Answer, usage: Optional[dict], forget: bool,
                      drop_key: bool = False) -> bool:
        key = None if drop_key else live.record.get("key")
        # A deleted run is forgotten at once, unless a key still points at it.
        keep = 0 if forget and not key else self._keep(key)
        # With an outbox, the usage record is kept in the same step that finishes the run: a process
        # that dies right after cannot leave a finished run unbilled (another process sends it).
        outbox = (usage, self._usage.outbox_lease) if usage is not None and self._usage.outbox_lease else None
        return self.store.finish_run(live.run_id, live.record["owner_account_id"], answer.stored(), keep,
                                     forget=forget, outbox=outbox)

    def _settled(self, live: Live, answer: Optional[Answer], usage: Optional[dict]) -> None:
        record = live.record
        if answer is not None:
            if usage is not None:
                self._usage.record_kept(usage) if self._usage.outbox_lease else self._usage.record_later(usage)
            self._uncount(live, answer.body.get("status") if answer.status == 200 else ERROR)
        else:
            # Another process completed it first: everyone here gets that answer (a record gone
            # altogether was deleted there and not kept for a key).
            self._uncount(live)
            answer = self._stored_answer(record["run_id"]) or live.answer or cancelled_answer(record, time.time())
        live.answer = answer
        self._untrack(live)
        live.done.set()

    def _stored_answer(self, run_id: str) -> Optional[Answer]:
        try:
            finished = self.store.read_run(run_id)
        except StateUnavailable:
            return None
        if finished is None or finished.get("answer") is None:
            return None
        return Answer.of(finished["answer"])

    # -- reading and waiting ---------------------------------------------------

    def read(self, run_id: str) -> Optional[dict]:
        """The record as kept, finished or running (a deleted one reads as none)."""
        record = self.store.read_run(run_id)
        return None if record is None or record.get("forgotten") else record

    def held(self, run_id: str) -> Optional[dict]:
        """The record as this process holds it (running, or answered and not yet stored), or None."""
        with self._lock:
            live = self._live.get(run_id)
        if live is None:
            return None
        if live.answer is not None:
            return dict(live.record, state=FINISHED, answer=live.answer.stored())
        return dict(live.record)

    def await_finished(self, run_id: str, timeout: float, gone: Callable[[], Optional[str]] = never,
                       adopt: bool = False) -> Optional[dict]:
        """The record once finished, or as it is when `timeout` passes or the caller goes.

        A record held here is waited for here; one held elsewhere is read from
        the store now and then, and with `adopt` taken over if nobody holds it.
        """
        deadline = time.monotonic() + timeout
        delay = READ_POLL[0]
        while True:
            with self._lock:
                live = self._live.get(run_id)
            if live is not None and live.done.wait(max(0.0, deadline - time.monotonic())) and live.answer:
                return dict(live.record, state=FINISHED, answer=live.answer.stored())
            record = self.read(run_id)
            if record is None or record["state"] == FINISHED or time.monotonic() >= deadline or gone():
                return record
            if adopt and live is None and self._adopt(run_id):
                continue
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, READ_POLL[1])

    # -- cancelling ----------------------------------------------------------

    def cancel(self, record: dict) -> Answer:
        """DELETE of a running run: stop it, finish it as cancelled for everyone waiting, forget it."""
        with self._lock:
            live = self._live.get(record["run_id"])
        live = live or Live(record, attached=False)
        self._cancel(live, cancelled_answer(record, time.time()), "deleted")
        live.done.wait(1.0)
        return live.answer

    def forget(self, record: dict) -> None:
        """DELETE of a finished run: the record goes with it."""
        self.store.drop_run(record["run_id"])

    # -- the keeper: leases, deadlines, adoption -----------------------------------

    def start(self) -> None:
        """Renew every lease, expire and adopt in the background; in a worker, after fork."""
        if self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._keep_loop, name="run-records", daemon=True)
        self._thread.start()

    def stop(self, hand_over: bool) -> None:
        """Stop the keeper; with `hand_over` (a shared store) give what we hold to whoever takes it next."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        with self._lock:
            held = [run_id for run_id, live in self._live.items() if not live.finishing]
            completers, self._completers = self._completers, None
        if hand_over and held:
            try:
                self.store.hold_runs(held, 0)
                log.info("left %d running records for another process to adopt", len(held))  # pragma: no mutate
            except StateUnavailable:
                log.warning("could not hand over %d running records; they are adopted when their leases pass",
                            len(held))  # pragma: no mutate
        if completers is not None:
            completers.shutdown(wait=True, cancel_futures=False)

    def cancel_detached(self, reason: str) -> None:
        """Shutting down with no store another process could adopt from: nobody would finish these."""
        with self._lock:
            detached = [live for live in self._live.values() if not live.attached]
        for live in detached:
            self._cancel(live, Answer.of_error(RunCancelled(reason), live.run_id), reason, drop_key=True)
        for live in detached:  # some may be cancelled by another thread (the drain) right now
            live.done.wait(CANCEL_WAIT)

    def wait_detached(self, over: threading.Event, timeout: float) -> None:
        """Wait until no detached run is left here, `over` is set or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not over.is_set():
            with self._lock:
                if not any(not live.attached for live in self._live.values()):
                    return
            over.wait(min(0.1, max(0.0, deadline - time.monotonic())))

    def in_flight(self) -> int:
        with self._lock:
            return len(self._live)

    def _keep_loop(self) -> None:
        next_renew = next_adopt = time.monotonic()
        while not self._stopping.wait(TICK):
            now = time.monotonic()
            try:
                self._expire()
                self._store_unstored()
                if now >= next_renew:
                    next_renew = now + RENEW_SECONDS
                    self._renew()
                if now >= next_adopt:
                    next_adopt = now + ADOPT_EVERY
                    self._adopt()
            except StateUnavailable as exc:
                log.warning("run records: %s", exc)  # pragma: no mutate
            except Exception:  # a bug must not end the keeper silently
                log.exception("keeping run records failed")  # pragma: no mutate

    def _expire(self) -> None:
        """Records no request thread waits for whose deadline passed: their answer is the 503."""
        now = time.time()
        due = []
        with self._lock:
            while self._deadlines and self._deadlines[0][0] <= now:
                _, run_id = heapq.heappop(self._deadlines)
                live = self._live.get(run_id)
                if live is not None and not live.attached and not live.replied.is_set():
                    due.append(live)
        for live in due:
            self._complete(live)

    def _store_unstored(self) -> None:
        with self._lock:
            unstored = [live for live in self._live.values() if live.unstored]
        for live in unstored:
            usage, forget, drop_key = live.unstored
            finished = self._store_answer(live, live.answer, usage, forget, drop_key)
            live.unstored = None
            self._settled(live, live.answer if finished else None, usage)

    def _renew(self) -> None:
        """Extend every lease this process holds: its slots and keys, then its records."""
        try:
            self._controls.renew()
        except StateUnavailable as exc:
            log.warning("could not renew run leases: %s", exc)  # pragma: no mutate
        with self._lock:
            held = [run_id for run_id, live in self._live.items() if not live.finishing]
        lost = self.store.hold_runs(held, LEASE_SECONDS) if held else []
        for run_id in lost:
            # Finished elsewhere (a DELETE on another process): our waiters get that answer now.
            with self._lock:
                live = self._live.get(run_id)
            record = self.store.read_run(run_id)
            if live is not None and (record is None or record["state"] == FINISHED):
                with self._lock:
                    live.finishing = True
                self.backend.release(live.handle)
                self._controls.release_slot(live.record["owner_account_id"], run_id)
                self._settled(live, None, None)

    def _adopt(self, run_id: Optional[str] = None) -> bool:
        """Take over running records whose holder went silent (or just `run_id`'s); True if any was taken."""
        if not self.backend.can_adopt():
            return False
        taken = self.store.take_runs(ADOPT_BATCH, LEASE_SECONDS, run_id)
        for record in taken:
            with self._lock:
                if record["run_id"] in self._live:
                    continue  # ours already: our lease lapsed while the store was away
            self._take_over(record)
        return bool(taken)

    def _take_over(self, record: dict) -> None:
        live = Live(record, attached=False, adopted=True)
        log.info("adopting run %s", record["run_id"])  # pragma: no mutate
        self._controls.hold_slot(record["owner_account_id"], record["run_id"])
        self._track(live)
        self._count(live)
        try:
            live.handle = self.backend.adopt(record["correlation_id"], partial(self._replied, live))
        except ProviderError as exc:
            # Our reply stream is down: give it back at once for a process that can wait for it.
            log.warning("could not adopt run %s: %s", record["run_id"], exc)  # pragma: no mutate
            self._uncount(live)
            self._untrack(live)
            self.store.hold_runs([record["run_id"]], 0)
