"""CONTRACT §2 security matrix, with tokens minted independently of the service.

Tokens come from PyJWT (not the service's own JOSE library) or are assembled by
hand (base64url header and payload, HMAC-SHA signature) for the shapes PyJWT
will not produce. Every rejection must be a 401 `invalid_auth` envelope with a
`WWW-Authenticate: Bearer` header, never a 500, and must not echo the token.
"""
import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from conftest import INTERNAL, PUBLIC, SECRET

KEY = SECRET.encode()
OTHER_KEY = b"another-secret-that-is-also-32-bytes-or-more"
STATUS = "/api/v1/containers/status"
RUNS = "/api/v1/containers/runs"
RUNNER = "/api/internal/containers/runner"
RUN_BODY = {"profile": "default"}
MAX_TOKEN = 8 * 1024

_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
_EC_KEY = ec.generate_private_key(ec.SECP256R1())


# --------------------------------------------------------------------------- helpers

def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def segment(value) -> str:
    """A compact JWS segment: bytes are taken as is, anything else as compact JSON."""
    if isinstance(value, bytes):
        return b64u(value)
    return b64u(json.dumps(value, separators=(",", ":")).encode())


def craft(header, payload, *, key=KEY, digest=hashlib.sha256, signature=None) -> str:
    """A hand-made compact token; signed with HMAC(key, digest) unless a signature is given."""
    signing_input = f"{segment(header)}.{segment(payload)}"
    if signature is None:
        signature = b64u(hmac.new(key, signing_input.encode("ascii"), digest).digest())
    return f"{signing_input}.{signature}"


def hs256(header_extra=None, **claim_overrides) -> str:
    """A hand-made, correctly HMAC-SHA256 signed token for the public zone."""
    return craft({"alg": "HS256", "typ": "JWT", **(header_extra or {})}, claims(**claim_overrides))


DROP = object()


def claims(**overrides) -> dict:
    """Valid public-zone claims; an override of DROP removes the claim."""
    now = int(time.time())
    body = {"sub": "acct-a", "aud": PUBLIC, "scope": "container:read container:run container:delete",
            "iat": now, "exp": now + 600}
    for name, value in overrides.items():
        if value is DROP:
            body.pop(name, None)
        else:
            body[name] = value
    return body


def pyjwt(payload, key=KEY, algorithm="HS256", headers=None) -> str:
    with warnings.catch_warnings():
        # PyJWT warns (an error under filterwarnings=error) when the key is short for HS384/HS512.
        warnings.simplefilter("ignore")
        return jwt.encode(payload, key, algorithm=algorithm, headers=headers)


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def assert_invalid_auth(response, token=None):
    assert response.status_code == 401, (response.status_code, response.get_data(as_text=True)[:500])
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    assert body["error"]["type"] == "invalid_auth"
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert response.headers.get("WWW-Authenticate", "").startswith("Bearer")
    assert_not_echoed(response, token)


def assert_not_echoed(response, token):
    if token and len(token) >= 5:
        text = response.get_data(as_text=True)
        assert token not in text
        # Nor the signature or payload part alone, when they are long enough to mean anything.
        for part in token.split("."):
            if len(part) >= 16:
                assert part not in text


def assert_forbidden(response, token=None):
    assert response.status_code == 403, (response.status_code, response.get_data(as_text=True)[:500])
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert body["error"]["type"] == "forbidden"
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert_not_echoed(response, token)


def call(client, method, path, token=None, headers=None):
    headers = dict(headers or {})
    if token is not None:
        headers.update(auth(token))
    kwargs = {}
    if method == "POST" and path == RUNS:
        kwargs["json"] = RUN_BODY
    return client.open(path, method=method, headers=headers, **kwargs)


# --------------------------------------------------------------------------- zones
# The rejection matrix runs against one public and one internal route; each token
# factory receives the zone so that "otherwise valid" means valid for that route.

class Zone:
    def __init__(self, name, path, aud, scope, other_aud):
        self.name, self.path, self.aud, self.scope, self.other_aud = name, path, aud, scope, other_aud

    def claims(self, **overrides):
        return claims(**{"aud": self.aud, "scope": self.scope, **overrides})

    def __repr__(self):
        return self.name


ZONES = [
    Zone("public", STATUS, PUBLIC, "container:read container:run container:delete", INTERNAL),
    Zone("internal", RUNNER, INTERNAL, "container:admin", PUBLIC),
]


@pytest.fixture(params=ZONES, ids=lambda z: z.name)
def zone(request):
    return request.param


# --------------------------------------------------------------------------- accepted tokens

ACCEPTED = {
    "pyjwt-hs256": lambda z: pyjwt(z.claims()),
    "handmade-hs256": lambda z: craft({"alg": "HS256", "typ": "JWT"}, z.claims()),
    "handmade-hs256-no-typ": lambda z: craft({"alg": "HS256"}, z.claims()),
    "aud-list-with-route-audience": lambda z: pyjwt(z.claims(aud=[z.aud])),
    "aud-list-with-extra-foreign-audience": lambda z: pyjwt(z.claims(aud=["https://example.invalid", z.aud])),
    "iat-30s-in-the-future": lambda z: pyjwt(z.claims(iat=int(time.time()) + 30)),
    "nbf-in-the-past": lambda z: pyjwt(z.claims(nbf=int(time.time()) - 60)),
    "extra-unknown-claims": lambda z: pyjwt(z.claims(jti="abc", iss="someone", owner_account_id="acct-evil")),
    "token-of-6-KiB": lambda z: pyjwt(z.claims(pad="x" * 4500)),
}


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_valid_tokens_are_accepted(client, zone, name):
    token = ACCEPTED[name](zone)
    if name == "token-of-6-KiB":
        assert len(token) < MAX_TOKEN
    response = client.get(zone.path, headers=auth(token))
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    assert_not_echoed(response, token)


def test_pyjwt_token_works_on_status(client):
    token = jwt.encode(claims(scope="container:read"), KEY, algorithm="HS256")
    response = client.get(STATUS, headers=auth(token))
    assert response.status_code == 200
    assert isinstance(response.get_json()["items"], list)


def test_lowercase_bearer_scheme_is_accepted(client):
    # RFC 7235 §2.1: the auth-scheme is case-insensitive.
    token = pyjwt(claims(scope="container:read"))
    response = client.get(STATUS, headers={"Authorization": f"bearer {token}"})
    assert response.status_code == 200


def test_token_without_scope_claim_is_forbidden_not_unauthenticated(client, zone):
    token = pyjwt(zone.claims(scope=DROP))
    assert_forbidden(client.get(zone.path, headers=auth(token)), token)


# --------------------------------------------------------------------------- rejected tokens

def _now():
    return int(time.time())


REJECTED = {
    # --- algorithm
    "alg-none-unsigned": lambda z: craft({"alg": "none", "typ": "JWT"}, z.claims(), signature=""),
    "alg-none-pyjwt": lambda z: jwt.encode(z.claims(), None, algorithm="none"),
    "alg-None-capitalised": lambda z: craft({"alg": "None"}, z.claims(), signature=""),
    "alg-NONE-upper": lambda z: craft({"alg": "NONE"}, z.claims(), signature=""),
    "alg-none-with-hmac-signature": lambda z: craft({"alg": "none"}, z.claims()),
    "alg-hs256-lowercase": lambda z: craft({"alg": "hs256"}, z.claims()),
    "alg-HS384-pyjwt-same-secret": lambda z: pyjwt(z.claims(), algorithm="HS384"),
    "alg-HS512-pyjwt-same-secret": lambda z: pyjwt(z.claims(), algorithm="HS512"),
    "alg-HS384-handmade-same-secret": lambda z: craft({"alg": "HS384"}, z.claims(), digest=hashlib.sha384),
    "alg-HS512-handmade-same-secret": lambda z: craft({"alg": "HS512"}, z.claims(), digest=hashlib.sha512),
    "alg-HS384-header-HS256-signature": lambda z: craft({"alg": "HS384"}, z.claims()),
    "alg-RS256": lambda z: pyjwt(z.claims(), key=_RSA_KEY, algorithm="RS256"),
    "alg-ES256": lambda z: pyjwt(z.claims(), key=_EC_KEY, algorithm="ES256"),
    "alg-PS256": lambda z: pyjwt(z.claims(), key=_RSA_KEY, algorithm="PS256"),
    "alg-int": lambda z: craft({"alg": 5}, z.claims()),
    "alg-list": lambda z: craft({"alg": ["HS256"]}, z.claims()),
    "alg-object": lambda z: craft({"alg": {"HS256": True}}, z.claims()),
    "alg-null": lambda z: craft({"alg": None}, z.claims()),
    "alg-true": lambda z: craft({"alg": True}, z.claims()),
    "alg-missing": lambda z: craft({"typ": "JWT"}, z.claims()),
    "alg-empty-string": lambda z: craft({"alg": ""}, z.claims()),
    # --- required claims
    "missing-sub": lambda z: pyjwt(z.claims(sub=DROP)),
    "missing-aud": lambda z: pyjwt(z.claims(aud=DROP)),
    "missing-exp": lambda z: pyjwt(z.claims(exp=DROP)),
    "missing-iat": lambda z: pyjwt(z.claims(iat=DROP)),
    "empty-claims-object": lambda z: pyjwt({}),
    # --- sub
    "sub-empty-string": lambda z: pyjwt(z.claims(sub="")),
    "sub-padded": lambda z: pyjwt(z.claims(sub=" acct-a")),
    "sub-blank": lambda z: pyjwt(z.claims(sub="   ")),
    "sub-int": lambda z: pyjwt(z.claims(sub=5)),
    "sub-null": lambda z: pyjwt(z.claims(sub=None)),
    "sub-true": lambda z: pyjwt(z.claims(sub=True)),
    "sub-list": lambda z: pyjwt(z.claims(sub=["acct-a"])),
    "sub-object": lambda z: pyjwt(z.claims(sub={"id": "acct-a"})),
    # --- times
    "exp-in-the-past": lambda z: pyjwt(z.claims(iat=_now() - 600, exp=_now() - 10)),
    "exp-long-ago": lambda z: pyjwt(z.claims(iat=1000, exp=2000)),
    "nbf-30s-in-the-future": lambda z: pyjwt(z.claims(nbf=_now() + 30)),
    "nbf-10min-in-the-future": lambda z: pyjwt(z.claims(nbf=_now() + 600)),
    "iat-10min-in-the-future": lambda z: pyjwt(z.claims(iat=_now() + 600, exp=_now() + 1200)),
    "exp-string": lambda z: pyjwt(z.claims(exp=str(_now() + 600))),
    "exp-true": lambda z: pyjwt(z.claims(exp=True)),
    "exp-false": lambda z: pyjwt(z.claims(exp=False)),
    "exp-null": lambda z: pyjwt(z.claims(exp=None)),
    "exp-list": lambda z: pyjwt(z.claims(exp=[_now() + 600])),
    "exp-NaN": lambda z: hs256(exp=float("nan"), aud=z.aud, scope=z.scope),
    "iat-string": lambda z: pyjwt(z.claims(iat=str(_now()))),
    "iat-true": lambda z: pyjwt(z.claims(iat=True)),
    "iat-false": lambda z: pyjwt(z.claims(iat=False)),
    "iat-null": lambda z: pyjwt(z.claims(iat=None)),
    "iat-NaN": lambda z: hs256(iat=float("nan"), aud=z.aud, scope=z.scope),
    "nbf-string-future": lambda z: pyjwt(z.claims(nbf=str(_now() + 600))),
    # --- audience
    "aud-wrong": lambda z: pyjwt(z.claims(aud="ai.hg.fi/other")),
    "aud-prefix-only": lambda z: pyjwt(z.claims(aud="ai.hg.fi")),
    "aud-with-suffix": lambda z: pyjwt(z.claims(aud=z.aud + "x")),
    "aud-other-zone": lambda z: pyjwt(z.claims(aud=z.other_aud)),
    "aud-empty-string": lambda z: pyjwt(z.claims(aud="")),
    "aud-empty-list": lambda z: pyjwt(z.claims(aud=[])),
    "aud-list-without-route-audience": lambda z: pyjwt(z.claims(aud=["ai.hg.fi/other"])),
    "aud-list-both-zones": lambda z: pyjwt(z.claims(aud=[PUBLIC, INTERNAL])),
    "aud-list-both-zones-reversed": lambda z: pyjwt(z.claims(aud=[INTERNAL, PUBLIC])),
    "aud-list-both-zones-plus-other": lambda z: pyjwt(z.claims(aud=["x", INTERNAL, "y", PUBLIC])),
    "aud-int": lambda z: pyjwt(z.claims(aud=5)),
    "aud-null": lambda z: pyjwt(z.claims(aud=None)),
    "aud-object": lambda z: pyjwt(z.claims(aud={z.aud: True})),
    # --- scope
    "scope-list": lambda z: pyjwt(z.claims(scope=z.scope.split())),
    "scope-int": lambda z: pyjwt(z.claims(scope=5)),
    "scope-object": lambda z: pyjwt(z.claims(scope={s: True for s in z.scope.split()})),
    # --- signature
    "signed-with-other-secret": lambda z: pyjwt(z.claims(), key=OTHER_KEY),
    "signature-empty": lambda z: craft({"alg": "HS256"}, z.claims(), signature=""),
    "signature-truncated": lambda z: pyjwt(z.claims())[:-4],
    "signature-garbage": lambda z: craft({"alg": "HS256"}, z.claims(), signature="AAAA"),
    "signature-from-other-payload": lambda z: _swap_payload(pyjwt(z.claims()), z.claims(sub="acct-evil")),
    "signature-with-padding": lambda z: pyjwt(z.claims()) + "=",
    # --- size
    "token-over-8KiB-signed": lambda z: _oversize(z),
    # --- refused headers, each on a correctly signed token
    "header-crit": lambda z: craft({"alg": "HS256", "crit": ["exp"]}, z.claims()),
    "header-crit-empty": lambda z: craft({"alg": "HS256", "crit": []}, z.claims()),
    "header-jwk": lambda z: craft({"alg": "HS256", "jwk": {"kty": "oct", "k": b64u(KEY)}}, z.claims()),
    "header-jku": lambda z: craft({"alg": "HS256", "jku": "http://127.0.0.1:9/jwks.json"}, z.claims()),
    "header-x5u": lambda z: craft({"alg": "HS256", "x5u": "http://127.0.0.1:9/cert.pem"}, z.claims()),
    "header-jku-pyjwt": lambda z: pyjwt(z.claims(), headers={"jku": "http://127.0.0.1:9/jwks.json"}),
    "header-crit-pyjwt": lambda z: pyjwt(z.claims(), headers={"crit": ["exp"]}),
}


def _swap_payload(token, payload):
    header, _, signature = token.split(".")
    return f"{header}.{segment(payload)}.{signature}"


def _oversize(zone):
    token = pyjwt(zone.claims(pad="x" * (MAX_TOKEN + 100)))
    assert len(token) > MAX_TOKEN
    return token


@pytest.mark.parametrize("name", sorted(REJECTED))
def test_rejected_tokens_answer_401(client, zone, name):
    token = REJECTED[name](zone)
    assert_invalid_auth(client.get(zone.path, headers=auth(token)), token)


# A token for both audiences is trusted in neither zone, on every route and method.
BOTH_ZONE_ROUTES = [
    ("GET", STATUS), ("GET", RUNS), ("POST", RUNS), ("GET", RUNS + "/x"), ("DELETE", RUNS + "/x"),
    ("GET", RUNNER), ("POST", RUNNER), ("DELETE", RUNNER),
]


@pytest.mark.parametrize("method,path", BOTH_ZONE_ROUTES)
def test_token_for_both_audiences_is_rejected_everywhere(client, method, path):
    token = pyjwt(claims(aud=[PUBLIC, INTERNAL],
                         scope="container:read container:run container:delete container:admin"))
    assert_invalid_auth(call(client, method, path, token), token)


# --------------------------------------------------------------------------- garbage

def _deep(depth):
    return b"[" * depth


GARBAGE = {
    "abc": lambda: "abc",
    "a.b.c": lambda: "a.b.c",
    "three-dots": lambda: "...",
    "two-dots": lambda: "..",
    "one-dot": lambda: ".",
    "two-segments": lambda: "a.b",
    "four-segments": lambda: "a.b.c.d",
    "five-segments-jwe-shape": lambda: "a.b.c.d.e",
    "valid-token-plus-segment": lambda: pyjwt(claims()) + ".x",
    "valid-token-trailing-dot": lambda: pyjwt(claims()) + ".",
    "valid-token-leading-dot": lambda: "." + pyjwt(claims()),
    "valid-token-inner-space": lambda: pyjwt(claims()).replace(".", ". ", 1),
    "non-ascii-latin1": lambda: "\u00e9t\u00e9.\u00e9t\u00e9.\u00e9t\u00e9",
    "non-ascii-latin1-high": lambda: "\u00ff" * 64,
    "non-ascii-inside-valid-token": lambda: pyjwt(claims())[:-3] + "\u00e9\u00e9\u00e9",
    "very-long-segments-under-limit": lambda: "A" * 3000 + "." + "B" * 3000 + "." + "C" * 1500,
    "very-long-segments-over-limit": lambda: "A" * 9000 + "." + "B" * 9000 + "." + "C" * 9000,
    "single-huge-blob": lambda: "x" * 100_000,
    "invalid-base64-chars": lambda: "!!!.@@@.###",
    "standard-base64-alphabet": lambda: "ab+/.cd+/.ef+/",
    "base64-with-padding": lambda: "e30=.e30=.e30=",
    "base64-bad-length": lambda: "a.a.a",
    "empty-objects-empty-sig": lambda: "e30.e30.",
    "header-json-array": lambda: craft(["HS256"], claims()),
    "header-json-string": lambda: craft("HS256", claims()),
    "header-json-null": lambda: craft(None, claims()),
    "header-json-number": lambda: craft(1, claims()),
    "header-not-json": lambda: craft(b"not json", claims()),
    "header-invalid-utf8": lambda: craft(b'{"alg":"HS256","x":"\xff\xfe"}', claims()),
    "header-trailing-data": lambda: craft(b'{"alg":"HS256"}{"alg":"none"}', claims()),
    "header-deeply-nested": lambda: craft(_deep(2000), claims()),
    "payload-json-array-signed": lambda: craft({"alg": "HS256"}, [claims()]),
    "payload-json-string-signed": lambda: craft({"alg": "HS256"}, "acct-a"),
    "payload-json-null-signed": lambda: craft({"alg": "HS256"}, None),
    "payload-json-number-signed": lambda: craft({"alg": "HS256"}, 12),
    "payload-not-json-signed": lambda: craft({"alg": "HS256"}, b"this is not json"),
    "payload-empty-signed": lambda: craft({"alg": "HS256"}, b""),
    "payload-invalid-utf8-signed": lambda: craft({"alg": "HS256"}, b'{"sub":"\xff\xfe"}'),
    "payload-trailing-data-signed": lambda: craft(
        {"alg": "HS256"}, json.dumps(claims()).encode() + b'{"sub":"acct-evil"}'),
    "payload-deeply-nested-signed": lambda: craft({"alg": "HS256"}, _deep(2000)),
    "payload-deeply-nested-bad-signature": lambda: craft({"alg": "HS256"}, _deep(2000), key=OTHER_KEY),
    "payload-deep-claim-signed": lambda: craft(
        {"alg": "HS256"}, b'{"sub":"acct-a","x":' + _deep(2000) + b"}"),
    "payload-huge-int-exp-signed": lambda: craft(
        {"alg": "HS256"}, json.dumps(claims(exp=DROP))[:-1].encode() + b',"exp":' + b"9" * 5000 + b"}"),
    "payload-exp-infinity-signed": lambda: craft(
        {"alg": "HS256"}, json.dumps(claims(exp=DROP))[:-1].encode() + b',"exp":Infinity}'),
}


@pytest.mark.parametrize("name", sorted(GARBAGE))
def test_garbage_tokens_answer_401_never_500(client, zone, name):
    token = GARBAGE[name]()
    assert_invalid_auth(client.get(zone.path, headers=auth(token)), token)


AUTHORIZATION_HEADERS = {
    "missing": None,
    "empty": "",
    "whitespace": "   ",
    "basic": "Basic dXNlcjpwYXNzd29yZA==",
    "basic-with-a-valid-jwt": "Basic {token}",
    "bearer-without-token": "Bearer",
    "bearer-with-space-only": "Bearer ",
    "bearer-with-spaces-only": "Bearer     ",
    "token-without-scheme": "{token}",
    "other-scheme": "Token {token}",
    "bearer-glued-to-token": "Bearer{token}",
    "bearer-twice": "Bearer Bearer {token}",
    "two-tokens": "Bearer {token} {token}",
}


@pytest.mark.parametrize("name", sorted(AUTHORIZATION_HEADERS))
def test_authorization_scheme_problems_answer_401(client, zone, name):
    token = pyjwt(zone.claims())
    template = AUTHORIZATION_HEADERS[name]
    headers = {} if template is None else {"Authorization": template.format(token=token)}
    assert_invalid_auth(client.get(zone.path, headers=headers), token)


@pytest.mark.parametrize("method,path", BOTH_ZONE_ROUTES)
def test_every_route_needs_a_token(client, method, path):
    assert_invalid_auth(call(client, method, path))


# --------------------------------------------------------------------------- scopes

PUBLIC_SCOPE_CASES = [
    # (method, path, scope the route needs)
    ("GET", STATUS, "container:read"),
    ("GET", RUNS, "container:read"),
    ("GET", RUNS + "/x", "container:read"),
    ("POST", RUNS, "container:run"),
    ("DELETE", RUNS + "/x", "container:delete"),
]
ALL_SCOPES = ["container:read", "container:run", "container:delete", "container:admin"]


@pytest.mark.parametrize("method,path,needed", PUBLIC_SCOPE_CASES)
def test_public_route_without_its_scope_is_403(client, method, path, needed):
    others = " ".join(s for s in ALL_SCOPES if s != needed)
    for scope in (others, "", needed + "x", needed.upper(), "container:*", needed.replace(":", " ")):
        token = pyjwt(claims(scope=scope))
        assert_forbidden(call(client, method, path, token), token)


@pytest.mark.parametrize("method,path,needed", PUBLIC_SCOPE_CASES)
def test_public_route_with_its_scope_passes_the_guard(client, method, path, needed):
    token = pyjwt(claims(scope=f"openid {needed} other"))
    response = call(client, method, path, token)
    expected = 404 if path.endswith("/x") else 200
    assert response.status_code == expected, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    if expected == 404:
        assert response.get_json()["error"]["type"] == "not_found"


def test_status_needs_container_read(client):
    token = pyjwt(claims(scope="container:run container:delete"))
    assert_forbidden(client.get(STATUS, headers=auth(token)), token)


def test_run_creation_needs_container_run(client):
    token = pyjwt(claims(scope="container:read container:delete"))
    assert_forbidden(client.post(RUNS, json=RUN_BODY, headers=auth(token)), token)


def test_run_deletion_needs_container_delete(client):
    token = pyjwt(claims(scope="container:read container:run"))
    assert_forbidden(client.delete(RUNS + "/x", headers=auth(token)), token)


def test_scope_is_checked_before_the_body(client):
    token = pyjwt(claims(scope="container:read"))
    response = client.post(RUNS, data=b"{not json", content_type="application/json", headers=auth(token))
    assert_forbidden(response, token)


INTERNAL_ROUTES = [("GET", 200), ("POST", 202), ("DELETE", 200)]


@pytest.mark.parametrize("method,expected", INTERNAL_ROUTES)
def test_internal_route_with_admin_token(client, method, expected):
    token = pyjwt(claims(aud=INTERNAL, scope="container:admin"))
    response = call(client, method, RUNNER, token)
    assert response.status_code == expected, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    if method == "GET":
        assert body["status"]["state"] == "ready"
    elif method == "POST":
        assert body == {"accepted": True, "action": "start"}
    else:
        assert body == {"deleted": True}


@pytest.mark.parametrize("method,expected", INTERNAL_ROUTES)
def test_internal_route_with_public_audience_is_401_whatever_the_scopes(client, method, expected):
    for aud in (PUBLIC, [PUBLIC]):
        token = pyjwt(claims(aud=aud, scope="container:admin container:read container:run container:delete"))
        assert_invalid_auth(call(client, method, RUNNER, token), token)


@pytest.mark.parametrize("method,expected", INTERNAL_ROUTES)
def test_internal_route_without_admin_scope_is_403(client, method, expected):
    for scope in ("", "container:read container:run container:delete", "container:adminx", "admin"):
        token = pyjwt(claims(aud=INTERNAL, scope=scope))
        assert_forbidden(call(client, method, RUNNER, token), token)


@pytest.mark.parametrize("method,path,needed", PUBLIC_SCOPE_CASES)
def test_internal_token_on_public_routes_is_401(client, method, path, needed):
    token = pyjwt(claims(aud=INTERNAL, scope=" ".join(ALL_SCOPES)))
    assert_invalid_auth(call(client, method, path, token), token)


def test_owner_is_the_token_subject(client):
    token = pyjwt(claims(sub="acct-sub", scope="container:run container:read"))
    response = client.post(RUNS + "?owner_account_id=acct-evil&account_id=acct-evil", json=RUN_BODY,
                           headers={**auth(token), "X-Account-Id": "acct-evil", "X-Owner-Account-Id": "acct-evil"})
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json()["owner_account_id"] == "acct-sub"
    for field in ("owner_account_id", "account_id"):
        response = client.post(RUNS, json={**RUN_BODY, field: "acct-evil"}, headers=auth(token))
        assert response.status_code == 400, response.get_data(as_text=True)  # unknown field (README)
        assert response.get_json()["error"]["type"] == "bad_request"


# --------------------------------------------------------------------------- the token command

def _command():
    script = Path(sys.executable).parent / "bus-api-provider-containers"
    if not script.exists():
        script = Path("/work/main/.venv/bin/bus-api-provider-containers")
    return str(script)


def _clean_env(**extra):
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("BUS_CONTAINERS_JWT_SECRET", "BUS_API_JWT_SECRET")}
    environment.update(extra)
    return environment


def _mint(*args, **env):
    return subprocess.run([_command(), "token", *args], env=_clean_env(**env),
                          capture_output=True, text=True, timeout=60)


def test_token_command_mints_a_token_pyjwt_verifies(client):
    before = int(time.time())
    result = _mint("--subject", "acct-x", "--scope", "container:read", BUS_CONTAINERS_JWT_SECRET=SECRET)
    after = int(time.time())
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n")
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and result.stdout == lines[0] + "\n"
    token = lines[0]
    assert token == token.strip() and token.count(".") == 2

    header = jwt.get_unverified_header(token)
    assert header["alg"] == "HS256"
    decoded = jwt.decode(token, KEY, algorithms=["HS256"], audience=PUBLIC,
                         options={"require": ["sub", "aud", "exp", "iat"]})
    assert decoded["sub"] == "acct-x"
    assert decoded["scope"] == "container:read"
    assert decoded["aud"] in (PUBLIC, [PUBLIC])
    assert before - 1 <= decoded["iat"] <= after + 1
    assert decoded["exp"] > decoded["iat"]
    assert abs(decoded["exp"] - decoded["iat"] - 3600) <= 1  # default --ttl 1h

    response = client.get(STATUS, headers=auth(token))
    assert response.status_code == 200, response.get_data(as_text=True)
    # container:read only: run creation is forbidden.
    assert_forbidden(client.post(RUNS, json=RUN_BODY, headers=auth(token)), token)


def test_token_command_without_secret_exits_2():
    result = _mint("--subject", "acct-x", "--scope", "container:read")
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "BUS_CONTAINERS_JWT_SECRET" in lines[0]


def test_token_command_with_short_secret_exits_2():
    result = _mint("--subject", "acct-x", "--scope", "container:read", BUS_CONTAINERS_JWT_SECRET="0123456789abcdef")
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "BUS_CONTAINERS_JWT_SECRET" in lines[0]
