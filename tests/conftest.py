"""Shared fixtures: an app per test built by the factory, and tokens for it."""
import pytest

from bus_containers_provider import create_app, start, stop
from bus_containers_provider.auth import mint_token

SECRET = "test-secret-that-is-at-least-32-bytes-long"
PUBLIC = "ai.hg.fi/api"
INTERNAL = "ai.hg.fi/internal"
ALL_PUBLIC_SCOPES = "container:read container:run container:delete"


def env(**extra) -> dict:
    """Environment variables for create_app, with the test secret."""
    return {"BUS_CONTAINERS_JWT_SECRET": SECRET, **extra}


def token(subject="acct-a", scope=ALL_PUBLIC_SCOPES, audience=PUBLIC, **kwargs) -> str:
    return mint_token(SECRET.encode(), subject, scope, audience, **kwargs)


def bearer(subject="acct-a", scope=ALL_PUBLIC_SCOPES, audience=PUBLIC) -> dict:
    return {"Authorization": f"Bearer {token(subject, scope, audience)}"}


@pytest.fixture
def app_env():
    """Override in a module to configure the app differently."""
    return env()


@pytest.fixture
def app(app_env):
    application = create_app(app_env)
    start(application)
    yield application
    stop(application)


@pytest.fixture
def client(app):
    return app.test_client()


EVENTS_TOKEN = "provider-events-token"
WORKER_TOKEN = "worker-events-token"


@pytest.fixture
def events_server():
    """A real Bus Events API on 127.0.0.1 (tests/eventsapi), stopped after the test."""
    from eventsapi import EventsServer

    server = EventsServer(tokens={EVENTS_TOKEN: None, WORKER_TOKEN: None}).start()
    yield server
    server.stop()


@pytest.fixture
def responder(events_server):
    """Integration workers answering bus.containers.*, usage and billing requests."""
    from eventsapi import Responder

    worker = Responder(events_server.url, WORKER_TOKEN).start()
    yield worker
    worker.stop()


def events_env(server, **extra) -> dict:
    """The events backend against `server`, with short waits; `extra` overrides any of them."""
    return env(**{"BUS_CONTAINERS_BACKEND": "events", "BUS_EVENTS_API_URL": server.url,
                  "BUS_API_TOKEN": EVENTS_TOKEN, "BUS_EVENTS_LISTENER_RETRY": "1",
                  "BUS_EVENTS_LISTENER_RETRY_MIN": "50ms", "BUS_EVENTS_LISTENER_RETRY_MAX": "500ms",
                  "BUS_EVENTS_LISTENER_DOWN_GRACE": "1s", "BUS_CONTAINERS_REQUEST_TIMEOUT": "3s",
                  "BUS_CONTAINERS_RUN_TIMEOUT_GRACE": "2s",
                  # A run without timeout_seconds waits this + grace: a lost reply must not hold a test for an hour.
                  "BUS_CONTAINERS_MAX_RUN_TIMEOUT": "30s", **extra})


def assert_error(response, status, error_type):
    """The contract's error envelope (§3): status, type, a message; Retry-After on a 503, Bearer on a 401."""
    assert response.status_code == status, (response.status_code, response.get_data(as_text=True)[:500])
    assert response.mimetype == "application/json"
    error = response.get_json()["error"]
    assert error["type"] == error_type, error
    assert isinstance(error["message"], str) and error["message"]
    if status == 503:
        retry_after = response.headers.get("Retry-After", "")
        assert retry_after.isdigit() and int(retry_after) >= 1, retry_after
    if status == 401:
        assert response.headers.get("WWW-Authenticate", "").startswith("Bearer")
    return error


def connected(app, timeout=5.0):
    """Wait, bounded, until every reply listener of `app` is connected."""
    bus = app.extensions["bus_containers"].bus
    assert bus.wait_connected(timeout), f"listeners not connected: {bus.disconnected()}"
    return app


class AnsweringBus:
    """Answers every request with one fixed envelope: for tests of how replies are read, not carried.

    A run request (expect, then publish) is answered as it is published, as a fast worker would.
    """

    def __init__(self, envelope):
        self.envelope = envelope
        self._expected = {}

    def request(self, name, payload, timeout, **options):
        return self.envelope

    def answer(self, payload):
        return self.envelope

    def expect(self, name, correlation_id, on_reply=None):
        self._expected[correlation_id] = on_reply
        return Expected(correlation_id)

    def publish(self, name, correlation_id, payload):
        on_reply = self._expected.get(correlation_id)
        if on_reply is not None:
            on_reply(self.answer(payload), None)

    def notify(self, name, payload):
        return None

    def forget(self, handle):
        self._expected.pop(handle.correlation_id, None)

    def recover(self, name, correlation_ids):
        return None

    def disconnected(self):
        return []


class Expected:
    """AnsweringBus's wait for a reply: already answered, so nothing to watch."""

    def __init__(self, correlation_id):
        self.correlation_id = correlation_id

    def watch(self, cancelled):
        return None

    def unwatch(self):
        return None


@pytest.fixture
def redis_server():
    """A real redis-server on a free 127.0.0.1 port (tests/redisserver.py), removed after the test."""
    from redisserver import RedisServer

    with RedisServer() as server:
        yield server


# Fault tests end with no waiter left in any reply registry they made (issue 11, point 5): a waiter
# left behind is a request never answered and memory never freed, after timeouts, refusals,
# dropped streams and shutdowns alike. Registries inside gunicorn-served processes are checked
# from outside by their own tests (tests/faults/test_workers.py).
FAULT_MODULES = ("faults/", "test_stream_faults.py", "test_events.py", "test_streams.py")
WAITER_SETTLE_SECONDS = 5.0  # for a request thread answered as the test ended to reach its finally


@pytest.fixture(autouse=True)
def no_waiter_left(request, monkeypatch):
    if not any(part in request.node.path.as_posix() for part in FAULT_MODULES):
        yield None
        return
    import time

    from bus_containers_provider.bus.replies import ReplyRegistry

    registries = []
    original = ReplyRegistry.__init__

    def recording(self, *args, **kwargs):
        original(self, *args, **kwargs)
        registries.append(self)

    monkeypatch.setattr(ReplyRegistry, "__init__", recording)
    yield registries
    deadline = time.monotonic() + WAITER_SETTLE_SECONDS
    while any(r.pending() for r in registries) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [r.pending() for r in registries if r.pending()]
    assert not left, f"waiters left in reply registries: {left}"


@pytest.fixture
def counted(monkeypatch):
    """Metrics on in this process (as --metrics-addr turns them on in a worker); reads one sample.

    tests/test_metrics.py reads the series summed over gunicorn workers; with this the same calls
    record into prometheus_client's in-process registry, for tests of what counts under which label.
    """
    from prometheus_client import REGISTRY

    from bus_containers_provider import metrics
    from bus_containers_provider.metrics import series

    monkeypatch.setattr(metrics, "_series", series)

    def value(name, **labels):
        return REGISTRY.get_sample_value(name, labels) or 0.0

    return value


class Changes:
    """What changed in the samples of `name`, one per value of `label`, across a block."""

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
