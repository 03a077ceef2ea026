"""A stand-in for the Bus integration workers, speaking real HTTP.

``Responder`` opens one unicast stream per request name (group ``responder``)
and publishes the matching ``.response`` event with the request's correlation
id, the way the containers, usage and billing workers do.

Choosing behaviour from a test:

* ``modes[request_name]`` — ``"ok"`` (default), ``"never"`` (no reply),
  ``"error"`` (reply with a top-level ``error`` object) or ``"malformed"``
  (reply with wrongly typed fields). ``usage_mode`` is the same switch for
  ``bus.usage.record.request``.
* A run request's ``profile`` picks its behaviour per call: ``exit:N``,
  ``sleep:SECONDS``, ``never``, ``malformed``, ``wrong-owner``, ``error``,
  ``owner-identity`` (owner under ``owner_identity_id``), ``snake-correlation``
  (reply carries ``correlation_id``), ``hold:NAME`` (the reply is made but kept
  until ``release(NAME)``: a run whose result must not exist before the test says
  so, e.g. across a process kill); anything else runs normally. ``held(NAME)``
  counts replies kept under a name.
* A reply whose publish fails is published again with backoff for up to
  ``publish_retry_for`` seconds, and streams that end are reopened, so the
  responder rides out an Events API restart like a deployed worker.
* ``billing[account_id]`` — a reply payload dict, ``"never"`` or ``"error"``;
  accounts not listed get ``billing_default`` (``{"allowed": True}``).

Status replies always add a shared ``runner-1`` item and another account's
``run_other`` so the provider's owner filtering is exercised.
"""

import json
import logging
import socket
import threading
import time
import uuid

import requests

log = logging.getLogger(__name__)

RUN = "bus.containers.run.request"
STATUS = "bus.containers.status.request"
DELETE = "bus.containers.delete.request"
RUNNER_STATUS = "bus.containers.runner.status.request"
RUNNER_START = "bus.containers.runner.start.request"
RUNNER_DELETE = "bus.containers.runner.delete.request"
USAGE = "bus.usage.record.request"
BILLING = "bus.billing.entitlement.check.request"
REQUEST_NAMES = (STATUS, RUN, DELETE, RUNNER_STATUS, RUNNER_START, RUNNER_DELETE,
                 USAGE, BILLING)

MALFORMED = {
    RUN: {"run_id": 5},
    STATUS: {"items": "nope"},
    DELETE: {"deleted": "yes", "run_id": 5},
    RUNNER_STATUS: {"status": "nope"},
    RUNNER_START: {"accepted": "yes"},
    RUNNER_DELETE: {"deleted": "yes"},
    USAGE: {"recorded": "yes"},
    BILLING: {"allowed": "yes"},
}
OTHER_ITEM = {"id": "run_other", "state": "running", "owner_account_id": "someone-else"}


class _Reply:
    """What to publish for one request; ``None`` from a handler means silence."""

    def __init__(self, payload, error=None, delay=0.0, snake=False, before_send=None, hold=None):
        self.payload = payload
        self.error = error
        self.delay = delay
        self.snake = snake
        self.before_send = before_send
        self.hold = hold


def close_stream(resp):
    """Close a streamed ``requests`` response now, even while a thread reads it.

    ``resp.close()`` alone does not wake a reader blocked in ``recv``; a
    socket shutdown does. The stream answers ``Connection: close``, so
    http.client has already detached the socket from the connection and
    only the response's file object still holds it.
    """
    raw = resp.raw
    sock = getattr(getattr(raw, "connection", None), "sock", None)
    if sock is None:
        fp = getattr(getattr(raw, "_fp", None), "fp", None)
        sock = getattr(getattr(fp, "raw", None), "_sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    resp.close()


class Responder:
    """Answers Bus request events over a real Events API; see module docstring."""

    def __init__(self, events_url, token, group="responder", consumer=None,
                 names=REQUEST_NAMES, reconnect_delay=0.1, read_timeout=30.0, publish_retry_for=30.0):
        url = events_url.rstrip("/")
        if url.endswith("/api/v1/events"):
            url = url[: -len("/api/v1/events")]
        self.events_url = url
        self.token = token
        self.group = group
        self.consumer = consumer or f"responder-{uuid.uuid4().hex[:8]}"
        self.names = tuple(names)
        self.reconnect_delay = reconnect_delay
        self.read_timeout = read_timeout
        self.publish_retry_for = publish_retry_for
        self.modes = {}
        self.billing = {}
        self.billing_default = {"allowed": True}
        self.usage_records = []
        self.refuse_usage = {}
        self.hold_usage = set()
        self.ignore_usage = {}
        self.publish_errors = 0
        self.publish_retries = 0
        self._lock = threading.Lock()
        self._runs = {}
        self._received = []
        self._stop = threading.Event()
        self._threads = []
        self._responses = {}
        self._connected = {name: threading.Event() for name in self.names}
        self._timers = set()
        self._held = {}  # hold name -> [(request name, correlation id, reply)], until release(name)
        self._released = set()
        self._handlers = {
            RUN: self._on_run, STATUS: self._on_status, DELETE: self._on_delete,
            RUNNER_STATUS: lambda p: _Reply(
                {"status": {"state": "ready", "provider": "responder", "details": {}}}),
            RUNNER_START: lambda p: _Reply({"accepted": True, "action": "start"}),
            RUNNER_DELETE: lambda p: _Reply({"deleted": True}),
            USAGE: self._on_usage, BILLING: self._on_billing,
        }

    @property
    def usage_mode(self):
        return self.modes.get(USAGE, "ok")

    @usage_mode.setter
    def usage_mode(self, mode):
        self.modes[USAGE] = mode

    # -- lifecycle -------------------------------------------------------

    def start(self, timeout=5.0):
        """Open every stream; raises RuntimeError if they are not up in time."""
        if self._threads:
            return self
        self._stop.clear()
        for name in self.names:
            thread = threading.Thread(target=self._listen, args=(name,),
                                      name=f"responder-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        if not self.wait_connected(timeout):
            self.stop()
            raise RuntimeError(f"responder streams not open at {self.events_url}")
        return self

    def stop(self, timeout=5.0):
        """Close the streams, cancel delayed replies, join the threads."""
        with self._lock:
            self._stop.set()
            responses = list(self._responses.values())
            timers = list(self._timers)
        for resp in responses:
            close_stream(resp)
        for timer in timers:
            timer.cancel()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads = []

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def wait_connected(self, timeout=5.0):
        """True once every stream has been answered with 200."""
        deadline = time.monotonic() + timeout
        return all(event.wait(max(0.0, deadline - time.monotonic()))
                   for event in self._connected.values())

    # -- inspection ------------------------------------------------------

    def received(self, name=None):
        """Request envelopes received so far (of one name), in arrival order."""
        with self._lock:
            return [dict(e) for e in self._received if name in (None, e.get("name"))]

    def held(self, name):
        """How many replies are kept under ``hold:NAME`` now."""
        with self._lock:
            return len(self._held.get(name, ()))

    def release(self, name):
        """Publish the replies kept under ``hold:NAME``, and answer later ones at once; returns how many."""
        with self._lock:
            self._released.add(name)
            held = self._held.pop(name, [])
        for request_name, correlation, reply in held:
            self._send(request_name, correlation, reply, None)
        return len(held)

    def runs(self, owner=None):
        """``{run_id: {"owner", "image", "exit_code"}}`` of runs not deleted."""
        with self._lock:
            return {k: dict(v) for k, v in self._runs.items()
                    if owner in (None, v["owner"])}

    # -- streams ---------------------------------------------------------

    def _listen(self, name):
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {self.token}"
        try:
            while not self._stop.is_set():
                try:
                    self._consume(session, name)
                except requests.RequestException as exc:
                    # Server restarts and dropped streams land here; reconnect.
                    log.debug("responder stream %s ended: %s", name, exc)
                except Exception:
                    log.exception("responder stream %s failed", name)
                self._connected[name].clear()
                self._stop.wait(self.reconnect_delay)
        finally:
            session.close()

    def _consume(self, session, name):
        params = {"name": name, "delivery": "unicast", "group": self.group,
                  "consumer": self.consumer}
        with session.get(f"{self.events_url}/api/v1/events/stream", params=params,
                         stream=True, timeout=(2.0, self.read_timeout)) as resp:
            if resp.status_code != 200:
                log.debug("responder stream %s refused: %s", name, resp.status_code)
                return
            with self._lock:
                if self._stop.is_set():
                    return
                self._responses[name] = resp
            self._connected[name].set()
            try:
                buffer = b""
                for chunk in resp.iter_content(chunk_size=None):
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        if line.strip():
                            self._handle(line, session)
            finally:
                with self._lock:
                    self._responses.pop(name, None)

    def _handle(self, line, session):
        try:
            envelope = json.loads(line)
        except ValueError:
            log.warning("responder got a line that is not JSON: %r", line[:200])
            return
        with self._lock:
            self._received.append(envelope)
        name = envelope.get("name")
        payload = envelope.get("payload")
        if not isinstance(payload, dict):
            payload = {}
        mode = self.modes.get(name, "ok")
        if mode == "never":
            return
        if mode == "error":
            reply = _Reply({}, error={"type": "worker_failed", "message": "boom"})
        elif mode == "malformed":
            reply = _Reply(dict(MALFORMED.get(name, {"unexpected": 5})))
        else:
            reply = self._handlers[name](payload)
        if reply is None:
            return
        correlation = envelope.get("correlationId", envelope.get("correlation_id"))
        if reply.hold is not None:
            with self._lock:
                if reply.hold not in self._released:
                    self._held.setdefault(reply.hold, []).append((name, correlation, reply))
                    return
        if reply.delay > 0:
            self._later(reply.delay, self._send, name, correlation, reply, None)
        else:
            self._send(name, correlation, reply, session)

    def _later(self, delay, fn, *args):
        # A timer per delayed reply keeps the stream reading other requests.
        def run():
            with self._lock:
                self._timers.discard(timer)
            if not self._stop.is_set():
                fn(*args)
        timer = threading.Timer(delay, run)
        timer.daemon = True
        with self._lock:
            self._timers.add(timer)
        timer.start()

    def _send(self, request_name, correlation, reply, session):
        if reply.before_send is not None:
            reply.before_send()
        body = {"name": request_name[: -len(".request")] + ".response",
                ("correlation_id" if reply.snake else "correlationId"): correlation,
                "payload": reply.payload}
        if reply.error is not None:
            body["error"] = reply.error
        post = session.post if session is not None else requests.post
        # Like a real integration worker: a reply whose publish fails (the Events
        # API restarting, a pooled connection that died with it) is published
        # again with backoff for up to `publish_retry_for` seconds. A publish
        # that timed out may have been stored, so the provider can see a reply
        # twice; its registry keeps the first.
        deadline = time.monotonic() + self.publish_retry_for
        delay, ok = 0.05, False
        while True:
            try:
                resp = post(f"{self.events_url}/api/v1/events", json=body, timeout=5.0,
                            headers={"Authorization": f"Bearer {self.token}"})
                ok = resp.status_code in (200, 202)
                if ok or (resp.status_code < 500 and resp.status_code != 429):
                    break  # published, or refused for good
            except requests.RequestException as exc:
                log.debug("responder could not publish %s: %s", body["name"], exc)
            if self._stop.is_set() or time.monotonic() + delay > deadline:
                break
            with self._lock:
                self.publish_retries += 1
            self._stop.wait(delay)
            delay = min(delay * 2, 1.0)
            post = requests.post  # a fresh connection: the pooled one may be the one that died
        if not ok:
            with self._lock:
                self.publish_errors += 1

    # -- workers ---------------------------------------------------------

    def _on_run(self, payload):
        started = time.monotonic()
        profile = payload.get("profile") if isinstance(payload.get("profile"), str) else ""
        kind, _, arg = profile.partition(":")
        if profile == "never":
            return None
        if profile == "malformed":
            return _Reply(dict(MALFORMED[RUN]))
        if profile == "error":
            return _Reply({}, error={"type": "runner_failed", "message": "boom"})
        command = payload.get("command") or []
        exit_code, delay = 0, 0.0
        try:
            exit_code = int(arg) if kind == "exit" else 0
            delay = float(arg) if kind == "sleep" else 0.0
        except ValueError:
            pass
        owner = payload.get("owner_account_id")
        run_id = payload.get("run_id") or f"run_{uuid.uuid4().hex}"
        image = payload.get("image") or f"profile:{profile}"
        result = {
            "run_id": run_id,
            "owner_identity_id" if profile == "owner-identity" else "owner_account_id":
                "someone-else" if profile == "wrong-owner" else owner,
            "runner_name": "responder", "image": image, "args": command,
            "exit_code": exit_code,
            "stdout": " ".join(str(part) for part in command),
            "stderr": "failed" if exit_code else "",
            "duration_ms": int(delay * 1000 + (time.monotonic() - started) * 1000),
            "runtime": {"state": "ready", "provider": "responder"},
        }

        def remember():
            if profile != "wrong-owner":
                with self._lock:
                    self._runs[run_id] = {"owner": owner, "image": image,
                                          "exit_code": exit_code}

        return _Reply(result, delay=delay, snake=profile == "snake-correlation",
                      before_send=remember, hold=arg if kind == "hold" else None)

    def _on_status(self, payload):
        owner = payload.get("owner_account_id")
        with self._lock:
            mine = [{"id": run_id, "state": "finished", "owner_account_id": owner,
                     "details": {"image": run["image"], "exit_code": run["exit_code"]}}
                    for run_id, run in self._runs.items() if run["owner"] == owner]
        items = [{"id": "runner-1", "state": "ready"}] + mine + [dict(OTHER_ITEM)]
        return _Reply({"items": items})

    def _on_delete(self, payload):
        run_id, owner = payload.get("run_id"), payload.get("owner_account_id")
        with self._lock:
            run = self._runs.get(run_id)
            if run is not None and run["owner"] == owner:
                del self._runs[run_id]
        # Like a real integration, another owner's run is as unknown as a missing one; the
        # provider's own check of a reply naming another owner is tested with crafted replies.
        if run is None or run["owner"] != owner:
            return _Reply({}, error={"type": "not_found", "message": "run not found"})
        return _Reply({"deleted": True, "run_id": run_id, "owner_account_id": owner})

    def _on_usage(self, payload):
        with self._lock:
            # hold_usage: event types never answered; ignore_usage[event_type] = N: the next N
            # such records are not answered; refuse_usage[event_type] = N: the next N such
            # records are answered with an error envelope.
            if payload.get("event_type") in self.hold_usage:
                return None
            if self.ignore_usage.get(payload.get("event_type"), 0) > 0:
                self.ignore_usage[payload["event_type"]] -= 1
                return None
            if self.refuse_usage.get(payload.get("event_type"), 0) > 0:
                self.refuse_usage[payload["event_type"]] -= 1
                return _Reply({}, error={"type": "usage_unavailable", "message": "usage store down"})
            self.usage_records.append(dict(payload))
        return _Reply({"recorded": True, "event_id": payload.get("event_id")})

    def _on_billing(self, payload):
        decision = self.billing.get(payload.get("account_id"), self.billing_default)
        if decision == "never":
            return None
        if decision == "error":
            return _Reply({}, error={"type": "billing_unavailable",
                                     "message": "billing worker failed"})
        return _Reply(dict(decision))
