"""The verified-token cache: bounded, keyed by the whole token, never used at or after exp."""
import pytest

from bus_containers_provider.auth import Principal, TokenVerifier, VerifiedTokens
from bus_containers_provider.errors import InvalidAuth
from conftest import INTERNAL, PUBLIC, SECRET, bearer, token

ALICE = Principal("alice", frozenset({"container:run"}))


class Clock:
    def __init__(self, now=1_000_000.0):
        self.now = now

    def __call__(self):
        return self.now


def test_an_entry_is_used_before_exp_and_never_at_or_after_it():
    clock = Clock()
    cache = VerifiedTokens(clock=clock)
    cache.put("t", PUBLIC, ALICE, exp=clock.now + 10)
    assert cache.get("t", PUBLIC) is ALICE
    clock.now += 10
    assert cache.get("t", PUBLIC) is None
    clock.now -= 5  # a clock stepping back does not revive what was dropped
    assert cache.get("t", PUBLIC) is None


@pytest.mark.parametrize("exp", [float("nan"), float("inf"), 10 ** 400, True, "2000000000", None])
def test_a_strange_exp_is_never_remembered(exp):
    cache = VerifiedTokens(clock=Clock())
    cache.put("t", PUBLIC, ALICE, exp=exp)
    assert len(cache) == 0 and cache.get("t", PUBLIC) is None


def test_the_cache_is_bounded_oldest_first():
    clock = Clock()
    cache = VerifiedTokens(size=2, clock=clock)
    for name in ("a", "b", "c"):
        cache.put(name, PUBLIC, ALICE, exp=clock.now + 60)
    assert len(cache) == 2
    assert cache.get("a", PUBLIC) is None and cache.get("c", PUBLIC) is ALICE


def test_a_cached_token_is_not_a_pass_for_another_audience_or_another_signature():
    verifier = TokenVerifier(SECRET.encode())
    valid = token("alice", "container:run", PUBLIC)
    assert verifier.verify(valid, PUBLIC).account == "alice"
    assert verifier.verify(valid, PUBLIC).account == "alice"  # from the cache
    with pytest.raises(InvalidAuth):
        verifier.verify(valid, INTERNAL)
    head, payload, signature = valid.split(".")
    forged = f"{head}.{payload}.{signature[:-2]}{'AA' if signature[-2:] != 'AA' else 'BB'}"
    with pytest.raises(InvalidAuth):
        verifier.verify(forged, PUBLIC)


def test_a_refused_token_is_not_remembered():
    verifier = TokenVerifier(SECRET.encode())
    with pytest.raises(InvalidAuth):
        verifier.verify(token("alice", "container:run", INTERNAL), PUBLIC)
    assert len(verifier._verified) == 0


def test_repeated_requests_with_one_token_keep_the_scope_checks(client):
    headers = bearer("alice", "container:read")
    for _ in range(2):
        assert client.get("/api/v1/containers/status", headers=headers).status_code == 200
        assert client.post("/api/v1/containers/runs", headers=headers, json={"profile": "codex"}).status_code == 403
