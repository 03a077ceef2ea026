"""Object and function level access (issue 11, point 2; OWASP API1 and API5).

- Another account's run id answers exactly like a run id nobody has (same status, same
  body), on GET and DELETE, with the static and the events backend, and the events
  backend publishes nothing beyond the lookup itself.
- Every rule in the app's url_map needs a token, except an explicit allow-list; each
  guarded rule opens for exactly one audience, and near-miss scopes open none.

tests/test_auth.py holds the token matrix for one public and one internal route; this
module walks every route, so a route added without its guard fails here.
"""
import re

import jwt
import pytest

from bus_containers_provider import create_app, start, stop
from bus_containers_provider.backends.events import EventsBackend
from bus_containers_provider.config import Settings
from bus_containers_provider.errors import OwnerMismatch
from conftest import INTERNAL, PUBLIC, SECRET, AnsweringBus, bearer, connected, env, events_env

RUNS = "/api/v1/containers/runs"
# Reachable without a token, on purpose: readiness probes (CONTRACT §2: the only one).
OPEN_RULES = {"/readyz"}
# Any valid token of its audience opens it, whatever its scopes: the API's own description.
ANY_SCOPE_RULES = {"/api/v1/containers/openapi.json"}
REAL_SCOPES = ["container:read", "container:run", "container:delete", "container:admin"]
# Near misses of every real scope: none of them is a real scope, so none may open anything.
NEAR_MISSES = ["container:runner", "container:run:x", "CONTAINER:RUN", "Container:Read", "container:*",
               "container:read,container:run", "container:readx", "container", "run", "admin",
               "container:admin:x", "xcontainer:delete", "container:delete:"]


def _drop_request_id(headers):
    return {k: v for k, v in headers.items() if k.lower() not in ("x-request-id", "date", "content-length")}


def assert_same_answer(foreign, missing):
    """Byte for byte the same answer, apart from the request id."""
    assert foreign.status_code == missing.status_code == 404, (foreign.data, missing.data)
    assert foreign.get_json() == missing.get_json()
    assert foreign.get_json()["error"]["type"] == "not_found"
    assert _drop_request_id(foreign.headers) == _drop_request_id(missing.headers)


# --------------------------------------------------------------------------- another account's run id

def test_static_another_accounts_run_reads_and_deletes_like_a_missing_one(client):
    run_id = client.post(RUNS, json={"profile": "p"}, headers=bearer("acct-a")).get_json()["run_id"]
    missing = "run_" + "0" * (len(run_id) - 4)
    for method in ("GET", "DELETE"):
        foreign = client.open(f"{RUNS}/{run_id}", method=method, headers=bearer("acct-b"))
        unknown = client.open(f"{RUNS}/{missing}", method=method, headers=bearer("acct-b"))
        assert_same_answer(foreign, unknown)
        assert run_id.encode() not in foreign.data
    # The foreign DELETE removed nothing: the owner still reads the run.
    assert client.get(f"{RUNS}/{run_id}", headers=bearer("acct-a")).status_code == 200


@pytest.fixture
def events_app(events_server, responder):
    app = create_app(events_env(events_server))
    start(app)
    connected(app)
    yield app
    stop(app)


# (method, the lookup it may publish)
LOOKUPS = [("GET", "bus.containers.status.request"), ("DELETE", "bus.containers.delete.request")]


@pytest.mark.parametrize("method,lookup", LOOKUPS)
def test_events_another_accounts_run_answers_like_a_missing_one_and_publishes_only_the_lookup(
        events_app, events_server, method, lookup):
    client = events_app.test_client()
    run_id = client.post(RUNS, json={"profile": "p", "args": ["true"]}, headers=bearer("acct-a")).get_json()["run_id"]
    missing = "run_" + "0" * (len(run_id) - 4)
    answers = []
    for target in (run_id, missing):
        before = len(events_server.published())
        answers.append(client.open(f"{RUNS}/{target}", method=method, headers=bearer("acct-b")))
        published = [e for e in events_server.published()[before:] if not e["name"].endswith(".response")]
        # The one lookup, in the caller's name only; no run, usage, billing or delete for the other account.
        assert [(e["name"], e["payload"]["owner_account_id"]) for e in published] == [(lookup, "acct-b")], published
    assert_same_answer(*answers)
    assert run_id.encode() not in answers[0].data
    assert client.get(f"{RUNS}/{run_id}", headers=bearer("acct-a")).status_code == 200


def test_a_delete_reply_naming_another_owner_is_403_and_shows_nothing():
    # An integration that does answer about another account's run: refused, as CONTRACT §3 says.
    reply = {"payload": {"deleted": False, "run_id": "run_1", "owner_account_id": "acct-other"}}
    backend = EventsBackend(AnsweringBus(reply), Settings(jwt_secret=b"x" * 32))
    with pytest.raises(OwnerMismatch) as caught:
        backend.delete("acct-a", "run_1")
    assert "acct-other" not in str(caught.value)


# --------------------------------------------------------------------------- the route inventory

def _path(rule) -> str:
    # Any value will do for a placeholder: the guard runs before the view looks at it.
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", "x", rule.rule)


def _routes(app):
    for rule in app.url_map.iter_rules():
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            yield rule.rule, method, _path(rule)


def _jwt(audience, scope) -> str:
    claims = {"sub": "acct-a", "aud": audience, "scope": scope, "iat": 1, "exp": 2 ** 40}
    return jwt.encode(claims, SECRET, algorithm="HS256")


def _call(client, method, path, token_value=None):
    headers = {"Authorization": f"Bearer {token_value}"} if token_value else {}
    kwargs = {"json": {"profile": "p"}} if method == "POST" else {}
    return client.open(path, method=method, headers=headers, **kwargs)


@pytest.fixture(scope="module")
def inventory_app():
    app = create_app(env())
    start(app)
    yield app
    stop(app)


def test_the_allow_list_names_real_rules(inventory_app):
    # A renamed open route must not leave a stale allow-list entry that hides a new one.
    assert OPEN_RULES <= {rule for rule, _, _ in _routes(inventory_app)}


def test_every_rule_outside_the_allow_list_needs_a_token(inventory_app):
    client = inventory_app.test_client()
    guarded = 0
    for rule, method, path in _routes(inventory_app):
        response = _call(client, method, path)
        if rule in OPEN_RULES:
            assert response.status_code == 200, (rule, method, response.data)
            continue
        guarded += 1
        assert response.status_code == 401, (rule, method, response.status_code, response.data)
        assert response.get_json()["error"]["type"] == "invalid_auth"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert guarded >= 8  # the five public and three internal routes of CONTRACT §3


def test_each_guarded_rule_opens_for_exactly_its_own_audience(inventory_app):
    client = inventory_app.test_client()
    every_scope = " ".join(REAL_SCOPES)
    for rule, method, path in _routes(inventory_app):
        if rule in OPEN_RULES:
            continue
        own, other = (INTERNAL, PUBLIC) if rule.startswith("/api/internal/") else (PUBLIC, INTERNAL)
        assert rule.startswith(("/api/internal/", "/api/v1/")), rule
        opened = _call(client, method, path, _jwt(own, every_scope))
        assert opened.status_code not in (401, 403), (rule, method, opened.data)
        for audience in (other, [other], [other, "https://example.invalid"]):
            refused = _call(client, method, path, _jwt(audience, every_scope))
            assert refused.status_code == 401, (rule, method, audience, refused.data)


def test_near_miss_scopes_open_no_rule(inventory_app):
    client = inventory_app.test_client()
    for rule, method, path in _routes(inventory_app):
        if rule in OPEN_RULES | ANY_SCOPE_RULES:
            continue
        audience = INTERNAL if rule.startswith("/api/internal/") else PUBLIC
        response = _call(client, method, path, _jwt(audience, " ".join(NEAR_MISSES)))
        assert response.status_code == 403, (rule, method, response.data)
        assert response.get_json()["error"]["type"] == "forbidden"


@pytest.mark.parametrize("scope", [REAL_SCOPES, " ".join(REAL_SCOPES).split(" ")[:1], {"container:read": True}, 5])
def test_a_scope_claim_that_is_not_a_string_grants_nothing(inventory_app, scope):
    client = inventory_app.test_client()
    for rule, method, path in _routes(inventory_app):
        if rule in OPEN_RULES:
            continue
        audience = INTERNAL if rule.startswith("/api/internal/") else PUBLIC
        response = _call(client, method, path, _jwt(audience, scope))
        assert response.status_code == 401, (rule, method, scope, response.data)

