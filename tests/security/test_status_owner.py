"""A status reply addressed to another account is a 403 with none of its content (CONTRACT §5).

Through the real Events API: the responder's status handler is swapped for one that
answers with a top-level owner, so the reply travels the same stream as any other.
"""
import pytest

from conftest import bearer, connected, events_env
from eventsapi.responder import STATUS, _Reply

ITEMS = [{"id": "runner-1", "state": "ready"},
         {"id": "run_mine", "state": "finished", "owner_account_id": "acct-a"},
         {"id": "run_theirs", "state": "running", "owner_account_id": "acct-b", "details": {"secret": "x1"}}]


@pytest.fixture
def app_env(events_server):
    return events_env(events_server)


@pytest.fixture
def answer(app, responder):
    """Make the responder answer every status request with `payload`."""
    connected(app)

    def set_reply(payload):
        responder._handlers[STATUS] = lambda request: _Reply(payload)

    return set_reply


@pytest.mark.parametrize("owner_key", ["owner_account_id", "owner_identity_id"])
@pytest.mark.parametrize("path", ["/api/v1/containers/status", "/api/v1/containers/runs",
                                  "/api/v1/containers/runs/run_mine"])
def test_reply_for_another_owner_is_403_and_shows_nothing(app, answer, owner_key, path):
    answer({owner_key: "acct-b", "items": ITEMS})
    response = app.test_client().get(path, headers=bearer("acct-a"))
    assert response.status_code == 403, response.data
    assert response.get_json()["error"]["type"] == "forbidden"
    for leaked in (b"run_mine", b"run_theirs", b"runner-1", b"acct-b", b"x1"):
        assert leaked not in response.data


def test_reply_for_the_caller_still_drops_other_owners_items(app, answer):
    answer({"owner_account_id": "acct-a", "items": ITEMS})
    response = app.test_client().get("/api/v1/containers/status", headers=bearer("acct-a"))
    assert response.status_code == 200, response.data
    assert response.get_json()["items"] == [{"id": "runner-1", "state": "ready"}, ITEMS[1]]


def test_reply_without_an_owner_is_filtered_per_item(app, answer):
    answer({"items": ITEMS})
    response = app.test_client().get("/api/v1/containers/status", headers=bearer("acct-a"))
    assert response.status_code == 200
    assert [item["id"] for item in response.get_json()["items"]] == ["runner-1", "run_mine"]
