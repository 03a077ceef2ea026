"""Input and resources (issue 11, point 3; OWASP API4 and API8), against the served provider.

One gunicorn process (events backend, real Events API and responder) serves the whole
module, spoken to over raw sockets where a normal client would hide what is tested:

- a body over 1 MiB is refused from its Content-Length, before any of it is sent;
- deep nesting and huge arrays are a 400, never a 500 or a RecursionError;
- run ids with NUL, "..", %2F or 10 KB are a 4xx and publish nothing;
- `command` has a cap (schemas.MAX_COMMAND_ITEMS / MAX_COMMAND_BYTES), the one README states;
- too many or too large headers, or a too long request line, are answered as the JSON envelope.
"""
import json
import re
import socket
from pathlib import Path

import pytest

import processes
from bus_containers_provider import MAX_BODY_BYTES
from bus_containers_provider.schemas import MAX_COMMAND_BYTES, MAX_COMMAND_ITEMS
from conftest import EVENTS_TOKEN, WORKER_TOKEN, bearer, events_env

RUNS = "/api/v1/containers/runs"
README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def served():
    from eventsapi import EventsServer, Responder

    server = EventsServer(tokens={EVENTS_TOKEN: None, WORKER_TOKEN: None}).start()
    responder = Responder(server.url, WORKER_TOKEN).start()
    env = processes.provider_env(**events_env(server, BUS_EVENTS_LISTENER_REQUIRED="1"))
    try:
        with processes.console_script("--backend", "events", "--workers", "1", env=env) as process:
            process.port = int(process.url.rsplit(":", 1)[1])
            process.events = server
            yield process
        assert "Traceback" not in process.output and "RecursionError" not in process.output, process.output
    finally:
        responder.stop()
        server.stop()


def exchange(port, head: bytes, body: bytes = b"", timeout=10.0):
    """Send `head` (and `body`), read one answer: (status, lower-cased headers, body bytes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"the connection closed without an answer: {data[:200]!r}"
            data += chunk
        raw_head, _, rest = data.partition(b"\r\n\r\n")
        lines = raw_head.decode("latin-1").split("\r\n")
        headers = {n.strip().lower(): v.strip() for n, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        return int(lines[0].split()[1]), headers, rest[:length]


def request_head(method, path, headers=(), content_length=None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: provider", *headers]
    if content_length is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {content_length}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def auth_header(scope="container:read container:run container:delete") -> str:
    return "Authorization: " + bearer(scope=scope)["Authorization"]


def assert_envelope(status, headers, body, expected_status, expected_type=None):
    assert status == expected_status, (status, body[:300])
    assert headers.get("content-type", "").startswith("application/json"), headers
    error = json.loads(body)["error"]
    assert isinstance(error["type"], str) and isinstance(error["message"], str)
    if expected_type:
        assert error["type"] == expected_type, error
    return error


def post_json(served, raw: bytes):
    head = request_head("POST", RUNS, [auth_header()], content_length=len(raw))
    return exchange(served.port, head, raw)


def published_requests(served):
    return [e["name"] for e in served.events.published() if e["name"].endswith(".request")]


# --------------------------------------------------------------------------- body size

def test_a_body_over_1_MiB_is_refused_before_it_is_sent(served):
    before = published_requests(served)
    # Headers only: a provider that read the body first would wait for it, and the read would time out.
    head = request_head("POST", RUNS, [auth_header()], content_length=MAX_BODY_BYTES + 1)
    status, headers, body = exchange(served.port, head, timeout=10)
    assert_envelope(status, headers, body, 413, "payload_too_large")
    assert published_requests(served) == before


def test_a_body_of_1_MiB_is_read(served):
    # The limit is the body, not less: a body of exactly 1 MiB is read and validated (an unknown
    # field), not refused for its size.
    raw = json.dumps({"profile": "p", "pad": ""}).encode()
    raw = raw[:-2] + b"x" * (MAX_BODY_BYTES - len(raw)) + raw[-2:]
    assert len(raw) == MAX_BODY_BYTES
    status, headers, body = post_json(served, raw)
    error = assert_envelope(status, headers, body, 400, "bad_request")
    assert "pad" in error["message"]


# --------------------------------------------------------------------------- shapes

NESTED = {
    "10,000 nested arrays": b"[" * 10_000 + b"]" * 10_000,
    "10,000 nested objects": b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
    "command of 10,000 nested arrays": b'{"profile":"p","command":' + b"[" * 10_000 + b"]" * 10_000 + b"}",
    "env of nested objects": b'{"profile":"p","env":' + b'{"A":' * 5_000 + b'"x"' + b"}" * 5_000 + b"}",
    "unclosed nesting": b'{"profile":"p","command":' + b"[" * 200_000,
}
HUGE = {
    "command of 200,000 items": json.dumps({"profile": "p", "command": ["a"] * 200_000}).encode(),
    "args of 100,000 numbers": json.dumps({"profile": "p", "args": list(range(100_000))}).encode(),
    "env of 50,000 entries": json.dumps({"profile": "p", "env": {f"V{i}": "" for i in range(50_000)}}).encode(),
    "80,000 unknown fields": json.dumps({f"f{i}": 0 for i in range(80_000)}).encode(),
}


@pytest.mark.parametrize("name", sorted({**NESTED, **HUGE}))
def test_deep_nesting_and_huge_arrays_are_400(served, name):
    raw = {**NESTED, **HUGE}[name]
    assert len(raw) <= MAX_BODY_BYTES, len(raw)
    before = published_requests(served)
    status, headers, body = post_json(served, raw)
    assert_envelope(status, headers, body, 400, "bad_request")
    assert published_requests(served) == before


# --------------------------------------------------------------------------- run ids

BAD_RUN_IDS = ["a%00b", "%00", "..", "%2e%2e", "..%2Fstatus", "a%2Fb", "%2F", "a\\b", "a%20b", "run%0d%0aX-A:%201",
               "%ff", ".hidden", "a" * 129, "a" * 10 * 1024]


@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_bad_run_ids_are_4xx_and_publish_nothing(served, method):
    for run_id in BAD_RUN_IDS:
        before = published_requests(served)
        status, headers, body = exchange(served.port, request_head(method, f"{RUNS}/{run_id}", [auth_header()]))
        error = assert_envelope(status, headers, body, status)
        # 414 is the request line over gunicorn's limit (limit_request_line), refused before the app.
        assert status in (400, 404, 414), (run_id[:40], status, error)
        assert published_requests(served) == before, run_id[:40]


def test_a_good_run_id_does_ask_the_backend(served):
    # The same probe with a well-formed id publishes its lookup: the check above can fail.
    before = len(published_requests(served))
    status, headers, body = exchange(served.port, request_head("GET", f"{RUNS}/run_0123abc", [auth_header()]))
    assert_envelope(status, headers, body, 404, "not_found")
    assert published_requests(served)[before:] == ["bus.containers.status.request"]


# --------------------------------------------------------------------------- the command cap

def test_command_at_its_caps_is_accepted_and_beyond_them_is_400(served):
    at_count = ["a"] * MAX_COMMAND_ITEMS
    status, _, body = post_json(served, json.dumps({"profile": "p", "command": at_count}).encode())
    assert status == 200, body[:300]
    half = MAX_COMMAND_BYTES // 2
    at_bytes = ["x" * half, "y" * (MAX_COMMAND_BYTES - half)]
    status, _, body = post_json(served, json.dumps({"profile": "p", "command": at_bytes}).encode())
    assert status == 200, body[:300]
    for field in ("command", "args"):
        for over in (at_count + ["a"], at_bytes + ["z"], ["é" * (MAX_COMMAND_BYTES // 2 + 1)]):
            status, headers, body = post_json(served, json.dumps({"profile": "p", field: over}).encode())
            assert_envelope(status, headers, body, 400, "bad_request")


def test_readme_states_the_command_cap():
    text = README.read_text()
    assert f"at most {MAX_COMMAND_ITEMS:,} entries" in text
    assert f"{MAX_COMMAND_BYTES // 1024} KiB in all" in text


# --------------------------------------------------------------------------- header limits

def test_too_many_headers_are_answered_as_json(served):
    extra = [f"X-Filler-{i}: {i}" for i in range(120)]  # gunicorn's limit_request_fields is 100
    status, headers, body = exchange(served.port, request_head("GET", "/readyz", extra))
    assert_envelope(status, headers, body, status)
    assert 400 <= status < 500


def test_a_header_too_large_is_answered_as_json(served):
    big = "X-Big: " + "b" * (20 * 1024)  # over limit_request_field_size (16 KiB)
    status, headers, body = exchange(served.port, request_head("GET", "/readyz", [big]))
    assert_envelope(status, headers, body, status)
    assert status in (400, 431), status


def test_a_head_over_64_KiB_is_answered_as_json(served):
    many = [f"X-Part-{i}: " + "p" * 8000 for i in range(10)]
    status, headers, body = exchange(served.port, request_head("GET", "/readyz", many))
    assert_envelope(status, headers, body, 431)


def test_a_request_line_too_long_is_answered_as_json(served):
    status, headers, body = exchange(served.port, request_head("GET", "/readyz?" + "q" * 8000))
    assert_envelope(status, headers, body, 414)


def test_within_the_limits_the_same_requests_are_served(served):
    # The probes above are refused for their size alone: the same shapes, smaller, are answered.
    extra = [f"X-Filler-{i}: {i}" for i in range(50)] + ["X-Big: " + "b" * 8000]
    status, _, body = exchange(served.port, request_head("GET", "/readyz?" + "q" * 1000, extra))
    assert status == 200, body
    assert re.fullmatch(rb'\{"ok":\s*true\}\s*', body), body
