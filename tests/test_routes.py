"""Every public and internal route on the static backend, with exact statuses and bodies."""
import json

import pytest

from conftest import INTERNAL, bearer

RUNS = "/api/v1/containers/runs"
STATUS = "/api/v1/containers/status"
RUNNER = "/api/internal/containers/runner"


def assert_error(response, status, error_type):
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert body["error"]["type"] == error_type
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def start_run(client, subject="acct-a", **body):
    body = body or {"profile": "codex", "args": ["sh", "-c", "printf OK"], "timeout_seconds": 300}
    response = client.post(RUNS, headers=bearer(subject), json=body)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def test_profile_run_answers_the_static_result(client):
    result = start_run(client)
    assert result["run_id"].startswith("run_")
    assert result == {
        "run_id": result["run_id"], "owner_account_id": "acct-a", "runner_name": "static",
        "image": "profile:codex", "args": ["sh", "-c", "printf OK"], "exit_code": 0,
        "stdout": "", "stderr": "", "duration_ms": 0, "runtime": {"state": "ready", "provider": "static"},
        "status": "succeeded", "stdout_truncated": False, "stderr_truncated": False,
    }


def test_image_run_keeps_image_and_command(client):
    result = start_run(client, image="alpine:latest", command=["sh", "-c", "printf OK"])
    assert result["image"] == "alpine:latest"
    assert result["args"] == ["sh", "-c", "printf OK"]


def test_command_wins_over_args_and_run_ids_are_fresh(client):
    first = start_run(client, image="alpine", command=["true"], args=["false"])
    second = start_run(client, image="alpine", command=["true"])
    assert first["args"] == ["true"]
    assert first["run_id"] != second["run_id"]


def test_profile_run_without_command_is_accepted(client):
    assert start_run(client, profile="codex")["args"] == []


@pytest.mark.parametrize("body", [
    {},
    {"args": ["x"]},
    {"image": "alpine"},
    {"image": "alpine", "command": []},
    {"image": "alpine", "command": [], "args": ["sh"]},
    {"profile": ""},
    {"profile": 5},
    {"profile": None},
    {"image": "alpine", "command": "sh -c true"},
    {"image": "alpine", "command": ["sh", 1]},
    {"profile": "codex", "timeout_seconds": -1},
    {"profile": "codex", "timeout_seconds": 1.5},
    {"profile": "codex", "timeout_seconds": "30"},
    {"profile": "codex", "timeout_seconds": True},
    {"profile": "codex", "timeout_seconds": 3601},
    {"profile": "codex", "owner_account_id": "acct-b"},
    {"profile": "codex", "account_id": "acct-b"},
    {"profile": "codex", "surprise": 1},
])
def test_invalid_run_bodies_are_400(client, body):
    assert_error(client.post(RUNS, headers=bearer(), json=body), 400, "bad_request")


@pytest.mark.parametrize("raw", [b"", b"{", b"{} {}", b'{"profile":"a"} x', b"[]", b'"text"', b"null", b"\xff\xfe",
                                 b'{"profile": NaN]'])
def test_malformed_json_is_400(client, raw):
    response = client.post(RUNS, headers=bearer(), data=raw, content_type="application/json")
    assert_error(response, 400, "bad_request")


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
def test_non_json_media_type_is_415(client, content_type):
    headers = dict(bearer(), **({"Content-Type": content_type} if content_type else {}))
    response = client.post(RUNS, headers=headers, data=json.dumps({"profile": "codex"}))
    assert_error(response, 415, "unsupported_media_type")


def test_json_with_charset_is_accepted(client):
    response = client.post(RUNS, headers=bearer(), data=json.dumps({"profile": "codex"}),
                           content_type="application/json; charset=utf-8")
    assert response.status_code == 200


def test_body_over_one_mebibyte_is_413(client):
    body = json.dumps({"profile": "codex", "args": ["x" * (1024 * 1024)]})
    assert_error(client.post(RUNS, headers=bearer(), data=body, content_type="application/json"),
                 413, "payload_too_large")


def test_timeout_at_the_maximum_is_accepted(client):
    assert start_run(client, profile="codex", timeout_seconds=3600)["exit_code"] == 0


def test_status_read_and_delete_round_trip(client):
    run = start_run(client)
    status = client.get(STATUS, headers=bearer()).get_json()["items"]
    assert {"id": "static", "state": "ready"} in status
    mine = [item for item in status if item["id"] == run["run_id"]]
    assert mine == [{"id": run["run_id"], "state": "finished", "owner_account_id": "acct-a",
                     "details": {"image": "profile:codex", "exit_code": 0}}]
    listed = client.get(RUNS, headers=bearer()).get_json()["items"]
    assert [item["id"] for item in listed] == [run["run_id"]]
    read = client.get(f"{RUNS}/{run['run_id']}", headers=bearer())
    # Read from the run's record (§9): the status item's fields, and the result as it was answered.
    assert read.status_code == 200 and read.get_json() == dict(mine[0], result=run)
    deleted = client.delete(f"{RUNS}/{run['run_id']}", headers=bearer())
    assert deleted.status_code == 200
    assert deleted.get_json() == {"deleted": True, "run_id": run["run_id"], "owner_account_id": "acct-a"}
    assert_error(client.get(f"{RUNS}/{run['run_id']}", headers=bearer()), 404, "not_found")
    assert_error(client.delete(f"{RUNS}/{run['run_id']}", headers=bearer()), 404, "not_found")


def test_accounts_are_isolated(client):
    mine = start_run(client, "acct-a")
    theirs = start_run(client, "acct-b")
    for path in (STATUS, RUNS):
        seen_by_b = {item["id"] for item in client.get(path, headers=bearer("acct-b")).get_json()["items"]}
        assert mine["run_id"] not in seen_by_b and theirs["run_id"] in seen_by_b
    assert_error(client.get(f"{RUNS}/{mine['run_id']}", headers=bearer("acct-b")), 404, "not_found")
    assert_error(client.delete(f"{RUNS}/{mine['run_id']}", headers=bearer("acct-b")), 404, "not_found")
    still_there = client.get(f"{RUNS}/{mine['run_id']}", headers=bearer("acct-a"))
    assert still_there.status_code == 200 and still_there.get_json()["owner_account_id"] == "acct-a"


def test_owner_comes_from_the_token_not_headers_or_query(client):
    headers = dict(bearer("acct-a"), **{"X-Account-Id": "acct-b", "X-Owner-Account-Id": "acct-b"})
    response = client.post(f"{RUNS}?owner_account_id=acct-b&account_id=acct-b", headers=headers,
                           json={"profile": "codex"})
    assert response.get_json()["owner_account_id"] == "acct-a"
    assert client.get(RUNS, headers=bearer("acct-b")).get_json()["items"] == []


def test_internal_runner_routes(client):
    admin = bearer("operator", "container:admin", INTERNAL)
    assert client.get(RUNNER, headers=admin).get_json() == {
        "status": {"state": "ready", "provider": "static", "details": {}}}
    started = client.post(RUNNER, headers=admin)
    assert started.status_code == 202 and started.get_json() == {"accepted": True, "action": "start"}
    deleted = client.delete(RUNNER, headers=admin)
    assert deleted.status_code == 200 and deleted.get_json() == {"deleted": True}


def test_public_token_never_opens_internal_routes(client):
    for method in ("get", "post", "delete"):
        response = getattr(client, method)(RUNNER, headers=bearer("acct-a", "container:admin container:read"))
        assert_error(response, 401, "invalid_auth")


@pytest.mark.parametrize("path", ["/", "/api/v1/containers", "/api/v1/containers/nope", "/api/v1/other",
                                  "/api/internal/containers/other", "/index.html"])
def test_unknown_routes_are_json_404(client, path):
    assert_error(client.get(path, headers=bearer()), 404, "not_found")


@pytest.mark.parametrize("method,path", [("put", RUNS), ("patch", RUNS), ("delete", STATUS), ("post", STATUS),
                                         ("put", RUNNER), ("post", "/readyz"), ("post", f"{RUNS}/run_x")])
def test_wrong_methods_are_json_405_with_allow(client, method, path):
    response = getattr(client, method)(path, headers=bearer())
    assert_error(response, 405, "method_not_allowed")
    assert response.headers["Allow"]


def test_readyz_needs_no_token(client):
    response = client.get("/readyz")
    assert response.status_code == 200 and response.get_json() == {"ok": True}


def test_an_integral_float_timeout_is_that_integer(client):
    # JSON Schema's integer (the published document says `type: integer`) includes 148.0; 148.5 is no integer.
    for sent in (148.0, 0.0, 3600.0):
        response = client.post(RUNS, headers=bearer(), json={"profile": "codex", "timeout_seconds": sent})
        assert response.status_code == 200, response.get_data(as_text=True)
    for sent in (148.5, 3601.0, -1.0, 1e300):
        assert_error(client.post(RUNS, headers=bearer(), json={"profile": "codex", "timeout_seconds": sent}),
                     400, "bad_request")
