"""CONTRACT §2 limits, tested on both sides of each edge.

The limits are pinned (60 s of `iat` skew, 8 KiB of token, `exp` strictly in
the future, `nbf` not in the future), so a change that moves one of them by a
second or a byte must fail here. Claims are whole seconds from the clock the
verifier reads; an attempt during which that second ended is made again, so no
edge depends on when the test happens to run.
"""
import time

import pytest

from test_auth import assert_invalid_auth, auth, claims, craft

STATUS = "/api/v1/containers/status"
MAX_TOKEN = 8 * 1024
IAT_SKEW = 60


def within_one_second(client, make_claims):
    """(token, response) for claims made from this second, asked within the same second."""
    for _ in range(10):
        now = int(time.time())
        issued = craft({"alg": "HS256", "typ": "JWT"}, claims(**{"iat": now, "exp": now + 600, **make_claims(now)}))
        response = client.get(STATUS, headers=auth(issued))
        if int(time.time()) == now:
            return issued, response
    raise AssertionError("ten attempts in a row each straddled a second")


def check(client, make_claims, accepted):
    issued, response = within_one_second(client, make_claims)
    if accepted:
        assert response.status_code == 200, response.get_data(as_text=True)
    else:
        assert_invalid_auth(response, issued)


@pytest.mark.parametrize("ahead,accepted", [(IAT_SKEW - 1, True), (IAT_SKEW, True), (IAT_SKEW + 1, False),
                                            (-3600, True)])
def test_iat_skew_is_60_seconds(client, ahead, accepted):
    check(client, lambda now: {"iat": now + ahead, "exp": now + 7200}, accepted)


@pytest.mark.parametrize("offset,accepted", [
    (-1, False),
    (0, False),  # RFC 7519 §4.1.4: on or after exp the token is not accepted
    (1, True),
])
def test_exp_has_no_leeway(client, offset, accepted):
    check(client, lambda now: {"iat": now - 60, "exp": now + offset}, accepted)


@pytest.mark.parametrize("offset,accepted", [(-1, True), (0, True), (1, False)])
def test_nbf_has_no_leeway(client, offset, accepted):
    check(client, lambda now: {"nbf": now + offset}, accepted)


def sized(length: int) -> str:
    """A correctly signed, valid token of exactly `length` characters (bytes: it is ASCII)."""
    now = int(time.time())
    # base64url grows by 4 characters per 3 bytes, so two paddings (a claim and a
    # header field) are needed to reach every length.
    for kid in range(0, 4):
        header = {"alg": "HS256", "typ": "JWT", **({"kid": "k" * kid} if kid else {})}
        for pad in range(length * 3 // 4 - 400, length * 3 // 4):
            candidate = craft(header, claims(iat=now, exp=now + 600, pad="x" * pad))
            if len(candidate) == length:
                return candidate
            if len(candidate) > length:
                break
    raise AssertionError(f"no token of {length} characters")


@pytest.mark.parametrize("length,accepted", [(MAX_TOKEN - 1, True), (MAX_TOKEN, True), (MAX_TOKEN + 1, False)])
def test_token_size_limit_is_8_KiB(client, length, accepted):
    issued = sized(length)
    assert len(issued.encode("ascii")) == length
    response = client.get(STATUS, headers=auth(issued))
    if accepted:
        assert response.status_code == 200, response.get_data(as_text=True)
    else:
        assert_invalid_auth(response, issued)


@pytest.mark.parametrize("separator", [" ", "  ", "   "])
def test_one_or_more_spaces_separate_the_scheme_and_the_token(client, separator):
    """RFC 7235 §2.1: credentials = auth-scheme 1*SP token68."""
    issued, _ = within_one_second(client, lambda now: {})
    response = client.get(STATUS, headers={"Authorization": f"Bearer{separator}{issued}"})
    assert response.status_code == 200, response.get_data(as_text=True)


def test_mint_token_issues_now_for_the_ttl_as_a_jwt():
    """The `token` command's claims and header, read back with PyJWT."""
    import jwt

    from bus_containers_provider.auth import mint_token
    from conftest import SECRET

    minted = mint_token(SECRET.encode(), "acct-x", "container:read", now=1_000_000.7)
    assert jwt.get_unverified_header(minted) == {"alg": "HS256", "typ": "JWT"}
    claims_read = jwt.decode(minted, SECRET, algorithms=["HS256"], audience="ai.hg.fi/api",
                             options={"verify_exp": False, "verify_iat": False})
    assert claims_read == {"sub": "acct-x", "aud": "ai.hg.fi/api", "scope": "container:read",
                           "iat": 1_000_000, "exp": 1_003_600}


@pytest.mark.parametrize("claim,value,accepted", [
    ("exp", 2 ** 53 - 1, True), ("exp", 2 ** 53, False),
    ("iat", -(2 ** 53) + 1, True), ("iat", -(2 ** 53), False),
    ("nbf", -(2 ** 53) + 1, True), ("nbf", -(2 ** 53), False),
])
def test_numeric_dates_stay_below_2_53(client, claim, value, accepted):
    """§2: a NumericDate is below 2^53 (in size: an exact integer in every JSON reader), on both sides."""
    check(client, lambda now: {claim: value}, accepted)


def test_claims_are_judged_on_the_verifiers_clock():
    """One clock for the claim checks and the verified-token cache: a verifier a day behind accepts what it should."""
    from bus_containers_provider.auth import TokenVerifier
    from bus_containers_provider.errors import InvalidAuth
    from conftest import SECRET
    from test_auth import claims as public_claims

    then = 1_000_000_000  # 2001: every token issued then is long expired by the wall clock
    verifier = TokenVerifier(SECRET.encode(), clock=lambda: then)
    issued = craft({"alg": "HS256", "typ": "JWT"}, public_claims(iat=then, exp=then + 600))
    assert verifier.verify(issued, "ai.hg.fi/api").account == "acct-a"
    ahead = craft({"alg": "HS256", "typ": "JWT"}, public_claims(iat=then + IAT_SKEW + 1, exp=then + 600))
    with pytest.raises(InvalidAuth):
        verifier.verify(ahead, "ai.hg.fi/api")
