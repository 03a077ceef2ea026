"""Hypothesis-driven robustness: no request, however malformed, gets a 500 or a non-JSON reply.

CONTRACT §3: "All bodies are JSON (application/json)" and "No request, however
malformed, produces a 500 or an HTML page"; errors always carry `error.type`
and `error.message`. §2: the owner account is the token's `sub`, whatever the
body, query or headers say.
"""
import json
import time

import jwt
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bus_containers_provider import create_app, start, stop
from conftest import INTERNAL, PUBLIC, SECRET, env
from fuzzing import examples

KEY = SECRET.encode()
ALL_PUBLIC = "container:read container:run container:delete"
RUNS = "/api/v1/containers/runs"

FUZZ = settings(
    max_examples=examples(250),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


@pytest.fixture(scope="module")
def fuzz_client():
    """One app for every generated example (module scope: no per-example fixture reuse)."""
    app = create_app(env())
    start(app)
    yield app.test_client()
    stop(app)


def mint(sub="acct-fuzz", scope=ALL_PUBLIC, aud=PUBLIC, ttl=3600):
    now = int(time.time())
    return jwt.encode({"sub": sub, "aud": aud, "scope": scope, "iat": now, "exp": now + ttl}, KEY, algorithm="HS256")


# --------------------------------------------------------------------------- strategies

# Header values as a WSGI server hands them over: latin-1 text without CR/LF/NUL.
header_text = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f"), max_size=60)

json_scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-(2 ** 80), max_value=2 ** 80)
                | st.floats() | st.text(max_size=20))
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=25,
)

FIELDS = ["profile", "image", "command", "args", "timeout_seconds", "env", "stdin",
          "owner_account_id", "account_id", "owner_identity_id", "run_id", "sub"]
field_dicts = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=len(FIELDS))

TRICKY_BODIES = [
    b"", b" ", b"{", b"}", b"{}", b"[]", b"null", b"0", b'""', b"{}{}", b"{} x", b'{"profile":"a"} []',
    b'{"profile":"a"}\x00', b"\xef\xbb\xbf{}", b'\xef\xbb\xbf{"profile":"a"}', '{"profile":"a"}'.encode("utf-16"),
    b'{"profile":"\xe9"}', b'{"profile":"a","profile":5}', b'{"timeout_seconds":NaN,"profile":"a"}',
    b'{"timeout_seconds":Infinity,"profile":"a"}', b'{"timeout_seconds":1e999,"profile":"a"}',
    b'{"timeout_seconds":' + b"9" * 5000 + b',"profile":"a"}', b"[" * 100_000, b'{"a":' * 50_000,
    b'{"profile":"a","command":' + b"[" * 5000 + b"]" * 5000 + b"}",
]

bodies = st.one_of(
    st.none(),
    st.binary(max_size=300),
    st.sampled_from(TRICKY_BODIES),
    json_values.map(lambda v: json.dumps(v).encode()),
    field_dicts.map(lambda v: json.dumps(v).encode()),
)

content_types = st.one_of(
    st.none(),
    st.sampled_from([
        "application/json", "application/json; charset=utf-8", "application/json; charset=latin-1",
        "APPLICATION/JSON", "application/json;", "application/jsonx", "application/json-patch+json",
        "application/problem+json", "text/json", "text/plain", "text/html", "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x", "multipart/form-data", "application/octet-stream", "", ";", "/",
        "*/*", "application/*", "json", "application/json; boundary=\x01",
    ]),
    header_text,
)

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE", "CONNECT", "FOO", "get", "M-SEARCH"]
methods = st.sampled_from(METHODS)

KNOWN_SUFFIXES = ["", "status", "status/", "runs", "runs/", "runs/x", "runs/run_0123", "runs/x/y", "runner",
                  "runner/", "runner/x", "..", "../v1/containers/status", "%2e%2e/status", "runs/%00", "runs/%ff",
                  "runs/%2F", "runs//x", "status?x=1", "runs?owner_account_id=acct-evil", "runs/\u00e9",
                  "runs/" + "a" * 3000]
path_text = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x2FF, blacklist_characters="#"), max_size=40)
paths = st.builds(
    lambda prefix, suffix: prefix + suffix,
    st.sampled_from(["/api/v1/containers/", "/api/internal/containers/"]),
    st.one_of(st.sampled_from(KNOWN_SUFFIXES), path_text,
              st.lists(st.sampled_from(["runs", "status", "runner", "x", "%00", "%ff", "..", "", "."]),
                       max_size=4).map("/".join)),
)

# Tokens are minted once per module import; each is valid for an hour.
VALID_TOKENS = {
    "public-all": mint(),
    "public-read": mint(scope="container:read"),
    "public-none": mint(scope=""),
    "internal-admin": mint(aud=INTERNAL, scope="container:admin"),
    "both-zones": mint(aud=[PUBLIC, INTERNAL], scope=ALL_PUBLIC + " container:admin"),
}
authorizations = st.one_of(
    st.none(),
    header_text,
    header_text.map(lambda t: "Bearer " + t),
    st.sampled_from(["Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Bearer a.b.c", "Bearer ...", "Bearer e30.e30."]),
    st.sampled_from(sorted(VALID_TOKENS)).map(lambda name: "Bearer " + VALID_TOKENS[name]),
    st.sampled_from(sorted(VALID_TOKENS)).map(lambda name: "bearer " + VALID_TOKENS[name]),
)

extra_headers = st.dictionaries(
    st.sampled_from(["X-Account-Id", "X-Owner-Account-Id", "X-Forwarded-For", "Idempotency-Key", "Accept",
                     "Content-Encoding", "Transfer-Encoding-X", "X-Subject"]),
    header_text, max_size=3)


# --------------------------------------------------------------------------- assertions

def assert_json_contract(response, method, secrets=()):
    """status < 500; application/json; errors carry string type and message; no token echoed."""
    raw = response.get_data()
    assert response.status_code < 500, (response.status_code, raw[:500])
    assert response.mimetype == "application/json", (response.status_code, response.content_type, raw[:200])
    if method == "HEAD":
        assert raw == b""
        return
    text = raw.decode("utf-8")
    body = json.loads(text)
    assert isinstance(body, dict), body
    if response.status_code >= 400:
        error = body.get("error")
        assert isinstance(error, dict), body
        assert isinstance(error.get("type"), str) and error["type"], body
        assert isinstance(error.get("message"), str) and error["message"], body
        if response.status_code == 401:
            assert error["type"] == "invalid_auth"
            assert response.headers.get("WWW-Authenticate", "").startswith("Bearer")
    for secret in secrets:
        assert secret not in text


def _headers(authorization, content_type, extra):
    headers = dict(extra)
    if authorization is not None:
        headers["Authorization"] = authorization
    if content_type is not None:
        headers["Content-Type"] = content_type
    return headers


def _secrets(authorization):
    if not authorization:
        return ()
    token = authorization.split(" ", 1)[-1].strip()
    return (token,) if len(token) >= 20 else ()


# --------------------------------------------------------------------------- fuzz tests

@FUZZ
@given(method=methods, path=paths, body=bodies, content_type=content_types, authorization=authorizations,
       extra=extra_headers)
@example(method="OPTIONS", path="/api/v1/containers/status", body=None, content_type=None, authorization=None,
         extra={})
@example(method="OPTIONS", path="/api/internal/containers/runner", body=None, content_type=None,
         authorization=None, extra={})
@example(method="POST", path=RUNS, body=b"[" * 100_000, content_type="application/json",
         authorization="Bearer " + VALID_TOKENS["public-all"], extra={})
@example(method="POST", path=RUNS, body=b"x" * (1024 * 1024 + 10), content_type="application/json",
         authorization="Bearer " + VALID_TOKENS["public-all"], extra={})
@example(method="POST", path=RUNS, body=b'{"profile":"a"}', content_type="text/plain",
         authorization="Bearer " + VALID_TOKENS["public-all"], extra={})
@example(method="POST", path=RUNS, body=b'{"profile":"a"}', content_type=None,
         authorization="Bearer " + VALID_TOKENS["public-all"], extra={})
def test_random_requests_answer_json_and_never_500(fuzz_client, method, path, body, content_type, authorization,
                                                    extra):
    response = fuzz_client.open(path, method=method, data=body, headers=_headers(authorization, content_type, extra))
    assert_json_contract(response, method, _secrets(authorization))


@FUZZ
@given(path=paths, method=methods, authorization=authorizations)
def test_random_routes_without_body(fuzz_client, path, method, authorization):
    headers = {} if authorization is None else {"Authorization": authorization}
    response = fuzz_client.open(path, method=method, headers=headers)
    assert_json_contract(response, method, _secrets(authorization))


# Run bodies that are often valid, with owner-choosing fields mixed in.
run_field_values = {
    "profile": st.one_of(st.text(min_size=1, max_size=30), json_values),
    "image": st.one_of(st.text(min_size=1, max_size=30), json_values),
    "command": st.one_of(st.lists(st.text(max_size=10), min_size=1, max_size=4), json_values),
    "args": st.one_of(st.lists(st.text(max_size=10), max_size=4), json_values),
    "timeout_seconds": st.one_of(st.integers(min_value=-5, max_value=4000),
                                 st.integers(min_value=0, max_value=4000).map(float), json_values),
    # CONTRACT §7: at most 64 names of [A-Za-z_][A-Za-z0-9_]*, string values, 32 KiB in all.
    "env": st.one_of(st.dictionaries(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True),
                                     st.text(max_size=10), max_size=4), json_values),
    "stdin": st.one_of(st.text(max_size=40), json_values),
    "owner_account_id": st.one_of(st.just("acct-evil"), json_values),
    "account_id": st.one_of(st.just("acct-evil"), json_values),
    "owner_identity_id": st.just("acct-evil"),
}
run_bodies = st.one_of(
    st.fixed_dictionaries({"profile": st.text(min_size=1, max_size=30)},
                          optional={k: v for k, v in run_field_values.items() if k != "profile"}),
    st.fixed_dictionaries({"image": st.text(min_size=1, max_size=30),
                           "command": st.lists(st.text(max_size=10), min_size=1, max_size=4)},
                          optional={k: v for k, v in run_field_values.items() if k not in ("image", "command")}),
    st.fixed_dictionaries({}, optional=run_field_values),
)
subjects = st.one_of(st.sampled_from(["acct-fuzz", "00000000-0000-4000-8000-000000000000"]),
                     st.text(min_size=1, max_size=24).filter(lambda s: s.strip() == s))


@FUZZ
@given(sub=subjects, body=run_bodies,
       content_type=st.sampled_from(["application/json", "application/json; charset=utf-8"]),
       query=st.sampled_from(["", "?owner_account_id=acct-evil", "?account_id=acct-evil&sub=acct-evil"]),
       spoof=st.dictionaries(st.sampled_from(["X-Account-Id", "X-Owner-Account-Id", "X-Subject"]),
                             st.just("acct-evil"), max_size=3))
def test_run_owner_is_always_the_token_subject(fuzz_client, sub, body, content_type, query, spoof):
    token = mint(sub=sub, scope="container:run container:read")
    response = fuzz_client.post(RUNS + query, data=json.dumps(body).encode(),
                                headers={"Authorization": f"Bearer {token}", "Content-Type": content_type, **spoof})
    assert_json_contract(response, "POST", (token,))
    assert response.status_code in (200, 400), response.get_data(as_text=True)
    if response.status_code == 200:
        result = response.get_json()
        assert result["owner_account_id"] == sub
        assert result["run_id"].startswith("run_")
        # The stored run belongs to the subject too, and only the subject can read it.
        read = fuzz_client.get(f"{RUNS}/{result['run_id']}", headers={"Authorization": f"Bearer {token}"})
        assert read.status_code == 200, read.get_data(as_text=True)
        assert read.get_json().get("owner_account_id") in (sub, None)
        if sub != "acct-evil":
            other = mint(sub="acct-evil", scope="container:read container:delete")
            for method in ("GET", "DELETE"):
                leaked = fuzz_client.open(f"{RUNS}/{result['run_id']}", method=method,
                                          headers={"Authorization": f"Bearer {other}"})
                assert leaked.status_code == 404, leaked.get_data(as_text=True)
    else:
        assert response.get_json()["error"]["type"] == "bad_request"


@FUZZ
@given(body=st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode()), st.none()),
       content_type=content_types, method=st.sampled_from(["GET", "POST", "DELETE"]))
def test_internal_runner_with_admin_token_ignores_bodies(fuzz_client, body, content_type, method):
    token = VALID_TOKENS["internal-admin"]
    headers = {"Authorization": f"Bearer {token}"}
    if content_type is not None:
        headers["Content-Type"] = content_type
    response = fuzz_client.open("/api/internal/containers/runner", method=method, data=body, headers=headers)
    assert_json_contract(response, method, (token,))
    # The runner routes take no body: whatever is sent, the answer is the route's own.
    assert (response.status_code, response.get_json()) == RUNNER_ANSWERS[method], response.get_data(as_text=True)


RUNNER_ANSWERS = {
    "GET": (200, {"status": {"state": "ready", "provider": "static", "details": {}}}),
    "POST": (202, {"accepted": True, "action": "start"}),
    "DELETE": (200, {"deleted": True}),
}


# --------------------------------------------------------------------------- fixed cases found worth pinning

@pytest.mark.parametrize("path", ["/api/v1/containers/status", "/api/v1/containers/runs",
                                  "/api/v1/containers/runs/x", "/api/internal/containers/runner"])
def test_options_without_token_is_not_an_unauthenticated_html_200(fuzz_client, path):
    """§2: every endpoint but /readyz needs a bearer; §3: every body is JSON."""
    response = fuzz_client.open(path, method="OPTIONS")
    assert response.mimetype == "application/json", (response.status_code, response.content_type)
    assert response.status_code >= 400, (response.status_code, response.headers.get("Allow"))
    assert_json_contract(response, "OPTIONS")


def test_body_over_one_mebibyte_is_413_json(fuzz_client):
    token = VALID_TOKENS["public-all"]
    response = fuzz_client.post(RUNS, data=b" " * (1024 * 1024 + 1), content_type="application/json",
                                headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 413
    assert_json_contract(response, "POST", (token,))
    assert response.get_json()["error"]["type"] == "payload_too_large"


@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"a":' * 50_000, b'{"profile":"a"} {}', b"\xff\xfe"])
def test_pathological_json_is_400(fuzz_client, body):
    token = VALID_TOKENS["public-all"]
    response = fuzz_client.post(RUNS, data=body, content_type="application/json",
                                headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 400, response.get_data(as_text=True)[:300]
    assert_json_contract(response, "POST", (token,))
    assert response.get_json()["error"]["type"] == "bad_request"


@pytest.mark.parametrize("method,path", [
    ("GET", "/api/v1/containers//status"),
    ("GET", "/api/v1/containers/runs//x"),
    ("DELETE", "/api/v1/containers/runs//x"),
    ("GET", "/api/internal/containers//runner"),
])
def test_doubled_slashes_answer_json_not_an_html_redirect(fuzz_client, method, path):
    """§3: no request produces an HTML page (werkzeug's merge_slashes redirect is one)."""
    for authorization in (None, "Bearer " + VALID_TOKENS["public-all"]):
        headers = {} if authorization is None else {"Authorization": authorization}
        response = fuzz_client.open(path, method=method, headers=headers)
        assert_json_contract(response, method, _secrets(authorization))
