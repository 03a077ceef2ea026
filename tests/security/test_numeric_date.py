"""NumericDate and the token edges of CONTRACT §2, on both sides of every edge.

The verifier gets a fixed clock, so "now" cannot tick between minting and checking.
Tokens are signed here by hand (HMAC-SHA256 over the raw JSON bytes), so a claim can be
any JSON text, including values a JWT library would refuse to produce.
"""
import base64
import hashlib
import hmac
import json

import pytest

from bus_containers_provider.auth import IAT_SKEW_SECONDS, MAX_TOKEN_BYTES, TokenVerifier
from bus_containers_provider.errors import InvalidAuth
from conftest import PUBLIC, SECRET

NOW = 1_800_000_000
KEY = SECRET.encode()


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign(payload: bytes, header=None) -> str:
    head = b64u(json.dumps(header or {"alg": "HS256", "typ": "JWT"}).encode())
    signing_input = f"{head}.{b64u(payload)}"
    return f"{signing_input}.{b64u(hmac.new(KEY, signing_input.encode(), hashlib.sha256).digest())}"


def token(header=None, **raw) -> str:
    """Claims as raw JSON texts (`exp="1e300"`), over valid defaults."""
    claims = {"sub": '"acct-a"', "aud": json.dumps(PUBLIC), "scope": '"container:read"',
              "iat": str(NOW - 10), "exp": str(NOW + 600), **raw}
    body = ",".join(f'"{name}":{text}' for name, text in claims.items() if text is not None)
    return sign(("{" + body + "}").encode(), header)


@pytest.fixture
def verifier():
    return TokenVerifier(KEY, clock=lambda: NOW)


def accepted(verifier, compact) -> bool:
    try:
        verifier.verify(compact, PUBLIC)
    except InvalidAuth:
        return False
    return True


def test_the_baseline_token_is_accepted(verifier):
    assert verifier.verify(token(), PUBLIC).account == "acct-a"


NOT_NUMERIC_DATES = ["1e300", "-1e300", "true", "false", '"1900000000"', "[1900000000]", "{}",
                     str(2 ** 53), str(2 ** 53 + 600), "9" * 4000, "NaN", "Infinity", "-Infinity", "1.8e16"]


@pytest.mark.parametrize("claim", ["exp", "iat", "nbf"])
@pytest.mark.parametrize("text", NOT_NUMERIC_DATES)
def test_anything_but_a_finite_number_below_2_53_is_refused(verifier, claim, text):
    assert not accepted(verifier, token(**{claim: text}))


@pytest.mark.parametrize("text", [str(NOW + 600), f"{NOW + 600}.5", f"{NOW + 600}.0", "1.9e9"])
def test_integer_and_fractional_numbers_are_dates(verifier, text):
    assert accepted(verifier, token(exp=text))


def test_the_largest_date_below_2_53_is_still_a_date(verifier):
    assert accepted(verifier, token(exp=str(2 ** 53 - 1)))


@pytest.mark.parametrize("offset,ok", [(-1, False), (0, False), (1, True)])
def test_exp_has_no_leeway(verifier, offset, ok):
    """exp is the first instant the token is no longer valid."""
    assert accepted(verifier, token(exp=str(NOW + offset))) is ok


@pytest.mark.parametrize("offset,ok", [(-1, True), (0, True), (1, False)])
def test_nbf_has_no_leeway(verifier, offset, ok):
    assert accepted(verifier, token(nbf=str(NOW + offset))) is ok


@pytest.mark.parametrize("skew,ok", [(59, True), (IAT_SKEW_SECONDS, True), (61, False), (600, False)])
def test_iat_may_run_ahead_by_60_seconds(verifier, skew, ok):
    assert accepted(verifier, token(iat=str(NOW + skew))) is ok


@pytest.mark.parametrize("claim", ["exp", "iat"])
@pytest.mark.parametrize("text", [None, "null"])
def test_exp_and_iat_are_required(verifier, claim, text):
    assert not accepted(verifier, token(**{claim: text}))


def sized(length: int) -> str:
    """A valid token exactly `length` characters long (padding a claim, then the header's kid)."""
    for kid in range(4):
        header = {"alg": "HS256", "typ": "JWT", **({"kid": "k" * kid} if kid else {})}
        base = len(token(header, pad='""'))
        for pad in range(max(0, (length - base) * 3 // 4 - 4), length):
            candidate = token(header, pad=json.dumps("p" * pad))
            if len(candidate) == length:
                return candidate
            if len(candidate) > length:
                break
    raise AssertionError(f"no token of length {length}")


@pytest.mark.parametrize("length,ok", [(MAX_TOKEN_BYTES - 1, True), (MAX_TOKEN_BYTES, True),
                                       (MAX_TOKEN_BYTES + 1, False)])
def test_token_size_limit_is_8_kib(verifier, length, ok):
    compact = sized(length)
    assert len(compact) == length
    assert accepted(verifier, compact) is ok


def test_through_the_app_a_never_expiring_token_is_a_401(client):
    response = client.get("/api/v1/containers/status",
                          headers={"Authorization": "Bearer " + token(exp="1e300", iat="1")})
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.get_json()["error"]["type"] == "invalid_auth"
