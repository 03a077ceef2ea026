"""The console script and gunicorn.conf.py: flags, start-up errors, and serving over real sockets."""
import re
import subprocess
import sys

import pytest
import requests

from conftest import SECRET, bearer
from processes import ROOT, SCRIPT, console_script, gunicorn_conf, provider_env

from bus_containers_provider.config import load_settings


def run_script(*args, **env_overrides):
    env = provider_env(**env_overrides)
    for name, value in env_overrides.items():
        if value is None:
            env.pop(name)
    return subprocess.run([str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=30)


def test_help_documents_every_flag_and_variable():
    text = run_script("--help").stdout
    for name in ("--addr", "--backend", "--events-url", "--usage-backend", "--billing-backend",
                 "--request-timeout", "--run-timeout-grace", "--max-run-timeout", "--workers", "--threads",
                 "BUS_CONTAINERS_ADDR", "BUS_CONTAINERS_BACKEND", "BUS_EVENTS_API_URL",
                 "BUS_CONTAINERS_USAGE_BACKEND", "BUS_CONTAINERS_BILLING_BACKEND",
                 "BUS_CONTAINERS_REQUEST_TIMEOUT", "BUS_CONTAINERS_RUN_TIMEOUT_GRACE",
                 "BUS_CONTAINERS_MAX_RUN_TIMEOUT", "BUS_CONTAINERS_WORKERS", "BUS_CONTAINERS_THREADS",
                 "BUS_CONTAINERS_JWT_SECRET", "BUS_API_JWT_SECRET", "BUS_API_TOKEN",
                 "BUS_EVENTS_LISTENER_REQUIRED", "BUS_EVENTS_LISTENER_RETRY",
                 "BUS_EVENTS_LISTENER_RETRY_MIN", "BUS_EVENTS_LISTENER_RETRY_MAX", "token"):
        assert name in text, name


@pytest.mark.parametrize("args,env,named", [
    (["--backend", "docker"], {}, "--backend"),
    (["--usage-backend", "disk"], {}, "--usage-backend"),
    (["--billing-backend", "memory"], {}, "--billing-backend"),
    (["--request-timeout", "soon"], {}, "--request-timeout"),
    (["--workers", "many"], {}, "--workers"),
    (["--workers", "0"], {}, "--workers"),
    (["--addr", "nohost"], {}, "--addr"),
    ([], {"BUS_CONTAINERS_BACKEND": "docker"}, "--backend"),
    ([], {"BUS_CONTAINERS_REQUEST_TIMEOUT": "soon"}, "BUS_CONTAINERS_REQUEST_TIMEOUT"),
    ([], {"BUS_CONTAINERS_JWT_SECRET": None}, "BUS_CONTAINERS_JWT_SECRET"),
    ([], {"BUS_CONTAINERS_JWT_SECRET": "short"}, "BUS_CONTAINERS_JWT_SECRET"),
    ([], {"BUS_CONTAINERS_JWT_SECRET": "base64:not base64!"}, "BUS_CONTAINERS_JWT_SECRET"),
    ([], {"BUS_CONTAINERS_JWT_SECRET": None, "BUS_API_JWT_SECRET": "short"}, "BUS_API_JWT_SECRET"),
    (["--backend", "events"], {}, "--events-url"),
    (["--backend", "events", "--events-url", "http://127.0.0.1:9"], {}, "BUS_API_TOKEN"),
    (["--usage-backend", "events"], {}, "--events-url"),
    (["--request-timeout", "5x"], {}, "--request-timeout"),
    (["--run-timeout-grace=1h30"], {}, "--run-timeout-grace"),
    (["--max-run-timeout=-1s"], {}, "--max-run-timeout"),
    (["--idempotency-ttl="], {}, "--idempotency-ttl"),
    ([], {"BUS_CONTAINERS_IDEMPOTENCY_TTL": "1d"}, "BUS_CONTAINERS_IDEMPOTENCY_TTL"),
    ([], {"BUS_EVENTS_LISTENER_RETRY_MAX": ""}, "BUS_EVENTS_LISTENER_RETRY_MAX"),
    ([], {"BUS_EVENTS_LISTENER_RETRY": "maybe"}, "BUS_EVENTS_LISTENER_RETRY"),
    ([], {"BUS_EVENTS_LISTENER_REQUIRED": "2"}, "BUS_EVENTS_LISTENER_REQUIRED"),
    ([], {"BUS_EVENTS_LISTENER_REQUIRED": " "}, "BUS_EVENTS_LISTENER_REQUIRED"),
])
def test_bad_configuration_fails_at_start_with_exit_2(args, env, named):
    result = run_script(*args, **env)
    assert result.returncode == 2
    assert named in result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
    if "LISTENER_RE" in named and "RETRY_MAX" not in named:
        assert "1, true, yes, on or 0, false, no, off (any case)" in result.stderr
    elif "TIMEOUT" in named or "TTL" in named or "GRACE" in named or "RETRY_MAX" in named:
        assert "Go's duration syntax" in result.stderr


def test_duration_flags_read_go_durations():
    from bus_containers_provider.cli import _serve_parser

    args = _serve_parser().parse_args(["--request-timeout", "1m30s", "--run-timeout-grace", "1500ms",
                                       "--max-run-timeout", "1.5h", "--idempotency-ttl", "2h45m30.5s"])
    settings = load_settings(provider_env(), **vars(args))
    assert (settings.request_timeout, settings.run_timeout_grace, settings.max_run_timeout,
            settings.idempotency_ttl) == (90, 1.5, 5400, 9930.5)


def test_the_token_lifetime_is_a_go_duration_too():
    import base64
    import json

    result = run_script("token", "--subject", "a", "--scope", "container:read", "--ttl", "1h30m")
    assert result.returncode == 0, result.stderr
    payload = result.stdout.strip().split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["exp"] - claims["iat"] == 5400


def test_help_and_readme_state_the_value_syntaxes_once():
    help_text = run_script("--help").stdout
    readme = (ROOT / "README.md").read_text()
    for text in (help_text, readme):
        assert text.count("Go's duration syntax") == 1
        assert text.count("1, true, yes, on") == 1


def test_secret_can_be_base64_and_fallback_variable():
    import base64

    encoded = "base64:" + base64.b64encode(SECRET.encode()).decode()
    result = run_script("token", "--subject", "a", "--scope", "container:read",
                        BUS_CONTAINERS_JWT_SECRET=None, BUS_API_JWT_SECRET=encoded)
    assert result.returncode == 0 and result.stdout.count(".") == 2


def test_console_script_serves_the_app_over_http():
    headers = bearer()
    with console_script() as provider:
        run = requests.post(f"{provider.url}/api/v1/containers/runs", headers=headers, timeout=10,
                            json={"image": "alpine:latest", "command": ["sh", "-c", "printf OK"]})
        assert run.status_code == 200 and run.json()["image"] == "alpine:latest"
        listed = requests.get(f"{provider.url}/api/v1/containers/runs", headers=headers, timeout=10).json()
        assert [item["id"] for item in listed["items"]] == [run.json()["run_id"]]
        bad = requests.post(f"{provider.url}/api/v1/containers/runs", timeout=10, data="{oops",
                            headers=dict(headers, **{"Content-Type": "application/json"}))
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "bad_request"
    assert provider.returncode == 0
    assert headers["Authorization"].split()[1] not in provider.output


def test_gunicorn_conf_serves_the_same_app_from_the_environment():
    with gunicorn_conf() as provider:
        status = requests.get(f"{provider.url}/api/v1/containers/status", headers=bearer(), timeout=10)
        assert status.status_code == 200 and status.json()["items"][0] == {"id": "static", "state": "ready"}
        anonymous = requests.get(f"{provider.url}/api/v1/containers/status", timeout=10)
        assert anonymous.status_code == 401 and anonymous.headers["WWW-Authenticate"].startswith("Bearer")


def test_static_backend_serves_one_worker_unless_told():
    with console_script() as provider:
        pass
    assert provider.output.count("Booting worker") == 1
    with console_script("--workers", "2") as provider:
        pass
    assert provider.output.count("Booting worker") == 2
    assert "static backend keeps runs per process" in provider.output


def test_importing_the_package_starts_no_thread():
    code = ("import threading, bus_containers_provider, bus_containers_provider.serving, "
            "bus_containers_provider.bus; print(threading.active_count())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert result.stdout.strip() == "1", result.stderr


def readme_configuration_rows():
    """(flags, variables, default, whole row) of each row of the README's configuration table."""
    section = (ROOT / "README.md").read_text().split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        if len(cells) == 4 and "BUS_" in cells[1]:
            default = re.match(r"`([^`]+)`", cells[2])
            rows.append((re.findall(r"--[a-z][a-z-]+", cells[0]), re.findall(r"BUS_[A-Z_]+", cells[1]),
                         default and default[1], line))
    return rows


def help_options(text):
    """--flag -> its help, joined over the lines argparse wrapped it onto."""
    options = text.split("\noptions:\n", 1)[1].split("\n\n", 1)[0]
    blocks = re.split(r"\n(?=  -)", options)
    return {re.findall(r"--[a-z][a-z-]+", block)[0]: " ".join(block.split()) for block in blocks}


def test_readme_configuration_table_and_help_agree():
    from bus_containers_provider.config import ENVIRONMENT, SECRET_VARIABLES

    text = run_script("--help", COLUMNS="200").stdout
    options = help_options(text)
    rows = readme_configuration_rows()
    flagged = {flags[0]: (variables, default) for flags, variables, default, _ in rows if flags}
    assert set(flagged) == set(options) - {"--help"}
    for flag, (variables, default) in flagged.items():
        assert f"({variables[0]}," in options[flag] or f"({variables[0]})" in options[flag], flag
        if default not in (None, "none"):
            assert f"default {default}" in options[flag], (flag, default)
    documented = {name for *_, row in rows for name in re.findall(r"BUS_[A-Z_]+", row)}
    assert set(ENVIRONMENT) | set(SECRET_VARIABLES) <= documented
    assert documented <= set(ENVIRONMENT) | set(SECRET_VARIABLES)
    for name in documented:
        assert name in text, name
