"""CONTRACT §1 BUS_EVENTS_TOKEN_FILE and §5 refused streams: the provider's Events token read from a file,
read again when it changes or is refused; a revoked token's streams back once the file is rewritten.
The listener's own backoff after a refusal is pinned in tests/test_listener.py.

Against the real Events API on 127.0.0.1 (tests/eventsapi), which is told to accept only a new token
the way a rotation revokes the old one.
"""
import logging
import os

import pytest
import requests

from conftest import EVENTS_TOKEN, WORKER_TOKEN, assert_error, bearer, connected, env, events_env
from inflight import wait_until
from processes import console_script, provider_env

from bus_containers_provider import create_app, credentials, start, stop
from bus_containers_provider.bus.client import EventsClient, EventsRejected
from bus_containers_provider.config import ConfigError, load_settings
from bus_containers_provider.credentials import TokenFile, TokenFileError, read_token_file

pytestmark = pytest.mark.timeout(30)

NEW_TOKEN = "rotated-provider-token"
VARIABLE_TOKEN = "token-from-the-variable"
NAME = "a.response"
RUNS = "/api/v1/containers/runs"
RUN_BODY = {"profile": "codex", "args": ["sh", "-c", "printf OK"], "timeout_seconds": 5}


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "events.jwt"
    path.write_text(f"  {EVENTS_TOKEN}\n")  # as `echo` and editors leave it
    return path


def rotate(server, path):
    """The old token is revoked, then the new one is written (in place, as `echo new > file` does)."""
    server.accept_tokens({NEW_TOKEN: None, WORKER_TOKEN: None})
    path.write_text(NEW_TOKEN + "\n")


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


# --- reading the file --------------------------------------------------------------

@pytest.mark.parametrize("content", ["tok", "tok\n", "  tok \r\n", "\n\ttok\n\n"])
def test_surrounding_white_space_and_the_trailing_newline_are_ignored(tmp_path, content):
    path = tmp_path / "t"
    path.write_text(content)
    assert read_token_file(str(path)) == "tok"


@pytest.mark.parametrize("content,problem", [
    ("", "is empty"), (" \n\t\n", "is empty"),
    ("secret-a secret-b", "must hold one token"), ("secret-a\nsecret-b\n", "must hold one token"),
    ("secret\x01", "must hold one token"), ("sécret", "must hold one token"),
    ("s" * (64 * 1024 + 1), "too large for a token"),
])
def test_a_file_without_one_token_is_refused_without_showing_its_content(tmp_path, content, problem):
    path = tmp_path / "t"
    path.write_text(content)
    with pytest.raises(TokenFileError) as refused:
        read_token_file(str(path))
    assert problem in str(refused.value) and str(path) in str(refused.value)
    assert "secret" not in str(refused.value) and "sss" not in str(refused.value)


@pytest.mark.parametrize("where", ["missing", "directory", "below a file"])
def test_a_file_that_cannot_be_read_is_refused_naming_it(tmp_path, where):
    path = {"missing": tmp_path / "nope", "directory": tmp_path, "below a file": tmp_path / "f" / "t"}[where]
    (tmp_path / "f").write_text("x")
    with pytest.raises(TokenFileError, match=f"^cannot read {path}: "):
        read_token_file(str(path))


def settings_env(**extra):
    """The events backend, for start-up checks only: nothing is connected."""
    return env(BUS_CONTAINERS_BACKEND="events", BUS_EVENTS_API_URL="http://127.0.0.1:9", **extra)


@pytest.mark.parametrize("content", [None, "", "\n"])
def test_an_events_backend_with_a_missing_or_empty_file_does_not_start_even_with_the_variable(tmp_path, content):
    path = tmp_path / "events.jwt"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as refused:
        load_settings(settings_env(BUS_API_TOKEN=VARIABLE_TOKEN, BUS_EVENTS_TOKEN_FILE=str(path)))
    assert str(refused.value).startswith("BUS_EVENTS_TOKEN_FILE: ")
    assert VARIABLE_TOKEN not in str(refused.value)


def test_the_file_stands_in_for_the_variable_and_neither_is_in_the_shown_configuration(token_file):
    settings = load_settings(settings_env(BUS_EVENTS_TOKEN_FILE=str(token_file)))
    shown = repr(settings) + str(settings.redacted()) + repr(TokenFile(str(token_file)))
    assert settings.events_token_file == str(token_file) and str(token_file) in shown
    assert EVENTS_TOKEN not in shown


def test_without_an_events_backend_the_file_is_not_read(tmp_path):
    """The Bus dispatcher sets the variable for every command; a static provider has no use for it."""
    settings = load_settings({**settings_env(), "BUS_CONTAINERS_BACKEND": "static",
                              "BUS_EVENTS_TOKEN_FILE": str(tmp_path / "nope")})
    assert not settings.uses_events


def test_the_console_script_refuses_a_missing_file_with_exit_2(tmp_path):
    import subprocess

    from processes import SCRIPT

    missing = tmp_path / "nope"
    result = subprocess.run([str(SCRIPT), "--backend", "events", "--events-url", "http://127.0.0.1:9"],
                            env=provider_env(BUS_API_TOKEN=VARIABLE_TOKEN, BUS_EVENTS_TOKEN_FILE=str(missing)),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"bus-api-provider-containers: error: BUS_EVENTS_TOKEN_FILE: cannot read "
                                     f"{missing}: No such file or directory")


# --- when the file is read again ------------------------------------------------------

def test_a_changed_file_is_read_on_use_at_most_once_per_check_interval(token_file, monkeypatch):
    clock, stats = Clock(), []
    real_signature = credentials._signature
    monkeypatch.setattr(credentials, "_signature", lambda path: stats.append(path) or real_signature(path))
    source = TokenFile(str(token_file), check_seconds=1.0, clock=clock)
    stats.clear()
    token_file.write_text(NEW_TOKEN)
    for _ in range(1000):  # every publish asks: no stat until the interval has passed
        assert source.value() == EVENTS_TOKEN
    assert stats == [] and source.generation == 1
    clock.now += 1.0
    assert source.value() == NEW_TOKEN and source.generation == 2
    assert len(stats) == 1
    clock.now += 1.0
    assert source.value() == NEW_TOKEN and source.generation == 2  # unchanged file: a stat, no new token
    assert len(stats) == 2


def test_rereading_reads_even_a_file_whose_stat_did_not_change(token_file):
    """A refusal reads the file whatever its stat says: a same-size rewrite within one mtime tick is not lost."""
    clock = Clock()
    source = TokenFile(str(token_file), check_seconds=1.0, clock=clock)
    before = os.stat(token_file)
    replacement = "x" * len(token_file.read_bytes().strip())
    with open(token_file, "r+") as file:  # same inode, same size, same mtime
        file.write(replacement + " " * (before.st_size - len(replacement)))
    os.utime(token_file, ns=(before.st_atime_ns, before.st_mtime_ns))
    clock.now += 5
    assert source.value() == EVENTS_TOKEN
    assert source.reread() == replacement and source.generation == 2


def test_a_file_caught_missing_or_empty_keeps_the_last_token_and_says_so_once(token_file, caplog):
    clock = Clock()
    source = TokenFile(str(token_file), check_seconds=1.0, clock=clock)
    token_file.unlink()
    for _ in range(3):
        clock.now += 1
        assert source.value() == EVENTS_TOKEN
        assert source.reread() == EVENTS_TOKEN
    token_file.write_text("")
    clock.now += 1
    assert source.value() == EVENTS_TOKEN
    token_file.write_text(NEW_TOKEN)
    clock.now += 1
    assert source.value() == NEW_TOKEN
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [f"BUS_EVENTS_TOKEN_FILE: cannot read {token_file}: No such file or directory; "
                      "the token read before it, if any, stays in use",
                      f"BUS_EVENTS_TOKEN_FILE: {token_file} is empty; the token read before it, if any, stays in use"]
    assert EVENTS_TOKEN not in caplog.text and NEW_TOKEN not in caplog.text


# --- the client, against the real Events API --------------------------------------------

@pytest.fixture
def rotating_client(events_server, token_file):
    """A client whose file is never checked on use: only a refusal can make it read the file again."""
    client = EventsClient(events_server.url, TokenFile(str(token_file), check_seconds=3600), connect_timeout=2)
    yield client
    client.close()


def test_a_refused_publish_reads_the_file_again_and_is_sent_once_with_the_new_token(rotating_client, events_server,
                                                                                     token_file):
    rotating_client.publish("a.request", "c1", {"n": 1})
    rotate(events_server, token_file)
    rotating_client.publish("a.request", "c2", {"n": 2})
    assert [(e["correlationId"], e["publisher_token"]) for e in events_server.published("a.request")] == [
        ("c1", EVENTS_TOKEN), ("c2", NEW_TOKEN)]


def test_a_refused_stream_open_reads_the_file_again_and_opens_with_the_new_token(rotating_client, events_server,
                                                                                 token_file):
    rotate(events_server, token_file)
    with rotating_client.open_stream(NAME, 5):
        pass
    assert [status for _, status in events_server.stream_answers(NAME)] == [401, 200]


def test_a_refusal_with_no_new_token_is_raised_after_one_try(rotating_client, events_server):
    events_server.accept_tokens({WORKER_TOKEN: None})
    with pytest.raises(EventsRejected) as refused:
        rotating_client.publish("a.request", "c1", {})
    assert refused.value.status == 401
    with pytest.raises(EventsRejected):
        rotating_client.open_stream(NAME, 5)
    assert [status for _, status in events_server.stream_answers(NAME)] == [401]


# --- the provider ---------------------------------------------------------------------------

@pytest.fixture
def provider(events_server, responder, token_file):
    """The events backend with its token in the file (the variable says something else: the file wins)."""
    app = create_app(events_env(events_server, BUS_API_TOKEN=VARIABLE_TOKEN, BUS_EVENTS_TOKEN_FILE=str(token_file),
                                BUS_EVENTS_LISTENER_REQUIRED="true", BUS_EVENTS_LISTENER_RETRY="yes",
                                BUS_EVENTS_LISTENER_RETRY_MAX="30s"))
    start(app)
    yield connected(app)
    stop(app)


def test_a_token_rotated_in_the_file_is_used_for_the_next_run_without_a_restart(provider, events_server,
                                                                                token_file, caplog):
    client = provider.test_client()
    assert client.post(RUNS, json=RUN_BODY, headers=bearer()).status_code == 200
    rotate(events_server, token_file)
    response = client.post(RUNS, json=RUN_BODY, headers=bearer())
    assert response.status_code == 200, response.get_data(as_text=True)
    assert [e["publisher_token"] for e in events_server.published("bus.containers.run.request")] == [
        EVENTS_TOKEN, NEW_TOKEN]
    for token in (EVENTS_TOKEN, NEW_TOKEN, VARIABLE_TOKEN):
        assert token not in caplog.text


def test_streams_refused_after_a_revocation_name_themselves_and_reopen_once_the_file_is_rewritten(
        provider, events_server, token_file, caplog):
    client = provider.test_client()
    events_server.accept_tokens({NEW_TOKEN: None, WORKER_TOKEN: None})
    events_server.drop_streams("bus.containers.run.response")
    wait_until(lambda: any(status == 401 for _, status in events_server.stream_answers("bus.containers.run.response")),
               timeout=10, what="the run reply stream refused")
    wait_until(lambda: "refused the provider's token for bus.containers.run.response (HTTP 401)" in caplog.text,
               timeout=5, what="the refusal logged")
    ready = client.get("/readyz")
    assert_error(ready, 503, "unavailable")
    assert ready.get_json()["error"]["message"] == "reply listeners not connected: bus.containers.run.response"
    assert_error(client.post(RUNS, json=RUN_BODY, headers=bearer()), 503, "unavailable")

    token_file.write_text(NEW_TOKEN + "\n")
    connected(provider, timeout=10)  # the 30 s backoff ends when the file changes
    assert client.get("/readyz").status_code == 200
    assert client.post(RUNS, json=RUN_BODY, headers=bearer()).status_code == 200
    for token in (EVENTS_TOKEN, NEW_TOKEN, VARIABLE_TOKEN):
        assert token not in caplog.text


def test_the_served_provider_reads_the_file_in_its_workers_and_never_prints_the_token(events_server, responder,
                                                                                     token_file):
    env = provider_env(**{k: v for k, v in events_env(events_server).items() if k != "BUS_API_TOKEN"},
                       BUS_EVENTS_TOKEN_FILE=str(token_file), BUS_EVENTS_LISTENER_REQUIRED="on")
    with console_script("--workers", "2", env=env) as served:
        wait_until(lambda: requests.get(f"{served.url}/readyz", timeout=5).status_code == 200, timeout=15,
                   what="both workers' listeners connected")
        url = f"{served.url}{RUNS}"
        assert requests.post(url, json=RUN_BODY, headers=bearer(), timeout=15).status_code == 200
        rotate(events_server, token_file)
        for _ in range(4):  # whichever worker answers, it has the new token
            assert requests.post(url, json=RUN_BODY, headers=bearer(), timeout=15).status_code == 200
    assert {e["publisher_token"] for e in events_server.published("bus.containers.run.request")[1:]} == {NEW_TOKEN}
    assert EVENTS_TOKEN not in served.output and NEW_TOKEN not in served.output
