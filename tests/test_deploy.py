"""The shipped deployment files: deploy/nginx, deploy/systemd.

nginx: the shipped server block is rendered for the test (listen port, upstream
port and access log path replaced by exact string match) and run as a real nginx
in front of the real provider (events backend, test Events API and responder).
The nginx binary is required: run tools/ensure-nginx.sh to install it.

systemd: the unit is checked structurally (and with `systemd-analyze verify`
where it exists); the environment example must be a valid configuration.
"""
import configparser
import contextlib
import grp
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import requests
from gunicorn.config import Config as GunicornConfig

from bus_containers_provider.config import ENVIRONMENT, SECRET_VARIABLES, ConfigError, load_settings
from bus_containers_provider.serving import gunicorn_options
from conftest import SECRET, bearer, events_env
from processes import ROOT, SCRIPT, console_script, free_port, provider_env

# Every test here waits on a provider, a stream or a server: a lost reply fails it at this bound.
pytestmark = pytest.mark.timeout(60)

NGINX_CONF = ROOT / "deploy" / "nginx" / "bus-containers.conf"
UNIT = ROOT / "deploy" / "systemd" / "bus-api-provider-containers.service"
ENV_EXAMPLE = ROOT / "deploy" / "systemd" / "bus-api-provider-containers.env.example"

# The values in the shipped nginx file that a test rendering replaces.
SHIPPED_LISTEN = "listen 80;"
SHIPPED_UPSTREAM = "server 127.0.0.1:8080;"
SHIPPED_ACCESS_LOG = "/var/log/nginx/bus-containers.access.log"
RUNS_LOCATION = re.compile(r"location = /api/v1/containers/runs \{(?P<body>[^{}]*)\}")

# CONTRACT §1: every variable the provider reads.
CONTRACT_VARIABLES = (
    "BUS_CONTAINERS_ADDR", "BUS_CONTAINERS_BACKEND", "BUS_EVENTS_API_URL", "BUS_CONTAINERS_USAGE_BACKEND",
    "BUS_CONTAINERS_BILLING_BACKEND", "BUS_CONTAINERS_REQUEST_TIMEOUT", "BUS_CONTAINERS_RUN_TIMEOUT_GRACE",
    "BUS_CONTAINERS_MAX_RUN_TIMEOUT", "BUS_CONTAINERS_WORKERS", "BUS_CONTAINERS_THREADS",
    "BUS_CONTAINERS_JWT_SECRET", "BUS_API_JWT_SECRET", "BUS_API_TOKEN", "BUS_EVENTS_LISTENER_REQUIRED",
    "BUS_EVENTS_LISTENER_RETRY", "BUS_EVENTS_LISTENER_RETRY_MIN", "BUS_EVENTS_LISTENER_RETRY_MAX",
    "BUS_EVENTS_TOKEN_FILE",
)
PLACEHOLDER = "CHANGE-ME"
RUN_BODY = {"profile": "codex", "args": ["sh", "-c", "printf OK"], "timeout_seconds": 30}


# --- helpers -----------------------------------------------------------------

def nginx_binary() -> str:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.access(binary, os.X_OK):
        pytest.fail("nginx is not installed: run tools/ensure-nginx.sh (as root) first", pytrace=False)
    return binary


def replace_once(text: str, old: str, new: str) -> str:
    """Replace a value of the shipped file; fail if the file no longer has it exactly once."""
    assert text.count(old) == 1, f"expected exactly one {old!r} in {NGINX_CONF.name}"
    return text.replace(old, new)


def nginx_seconds(value: str) -> float:
    """An nginx time value (`3700s`, `90`, `1h`, `500ms`, `1h 2m`) in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "": 1}
    parts = re.findall(r"(\d+)(ms|s|m|h|d|)", value.replace(" ", ""))
    assert parts and "".join(n + u for n, u in parts) == value.replace(" ", ""), value
    return sum(int(number) * units[unit] for number, unit in parts)


def strip_comments(config: str) -> str:
    return "\n".join(line.split("#", 1)[0] for line in config.splitlines())


def directive(block: str, name: str) -> str:
    """The value of `name` in a block of nginx config, comments ignored."""
    values = re.findall(rf"^\s*{name}\s+([^;]+);", strip_comments(block), re.MULTILINE)
    assert len(values) == 1, f"expected one {name} in block, found {values}"
    return values[0].strip()


def runs_location(text: str) -> re.Match:
    match = RUNS_LOCATION.search(text)
    assert match, "no `location = /api/v1/containers/runs { ... }` block in the nginx config"
    return match


def server_level(text: str) -> str:
    """The server block's own directives, without its nested location blocks."""
    code = strip_comments(text)
    server = code[code.index("server {"):]
    # Location blocks are flat; a JSON body in `return '{...}'` is skipped as a quoted string.
    return re.sub(r"location [^{]*\{(?:'[^']*'|[^{}'])*\}", "", server)


def render(tmp_path: Path, listen_port: int, upstream_port: int, runs_read_timeout=None) -> Path:
    """The shipped config with test ports and paths, optionally another runs read timeout."""
    text = NGINX_CONF.read_text()
    text = replace_once(text, SHIPPED_LISTEN, f"listen 127.0.0.1:{listen_port};")
    text = replace_once(text, SHIPPED_UPSTREAM, f"server 127.0.0.1:{upstream_port};")
    text = replace_once(text, SHIPPED_ACCESS_LOG, str(tmp_path / "access.log"))
    if runs_read_timeout is not None:
        match = runs_location(text)
        shipped = f"proxy_read_timeout {directive(match['body'], 'proxy_read_timeout')};"
        body = replace_once(match["body"], shipped, f"proxy_read_timeout {runs_read_timeout};")
        text = text[:match.start("body")] + body + text[match.end("body"):]
    site = tmp_path / "bus-containers.conf"
    site.write_text(text)
    return site


def main_conf(tmp_path: Path, site: Path) -> Path:
    """A minimal nginx.conf that keeps every file nginx writes in tmp_path."""
    user = ""
    if os.geteuid() == 0:  # as root, workers would otherwise run as nobody, without access to tmp_path
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name};"
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"""
{user}
daemon off;
master_process on;
worker_processes 1;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {tmp_path}/access-default.log;
    client_body_temp_path {tmp_path}/client_body;
    proxy_temp_path {tmp_path}/proxy;
    fastcgi_temp_path {tmp_path}/fastcgi;
    uwsgi_temp_path {tmp_path}/uwsgi;
    scgi_temp_path {tmp_path}/scgi;
    include {site};
}}
""")
    return conf


@contextlib.contextmanager
def nginx(tmp_path: Path, upstream_port: int, runs_read_timeout=None):
    """A real nginx serving the rendered config on a free 127.0.0.1 port; yields its URL."""
    binary = nginx_binary()
    port = free_port()
    conf = main_conf(tmp_path, render(tmp_path, port, upstream_port, runs_read_timeout))
    command = [binary, "-p", f"{tmp_path}/", "-e", f"{tmp_path}/error.log", "-c", str(conf)]
    check = subprocess.run([*command, "-t"], capture_output=True, text=True, timeout=10)
    assert check.returncode == 0, check.stderr
    with open(tmp_path / "nginx.out", "w+") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 5
            while True:
                assert process.poll() is None, f"nginx exited: {(tmp_path / 'error.log').read_text()}"
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
                assert time.monotonic() < deadline, "nginx did not listen within 5 s"
                time.sleep(0.05)
            yield f"http://127.0.0.1:{port}"
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)  # nginx: fast shutdown
                try:
                    process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(timeout=5)


@contextlib.contextmanager
def provider(events_server, port):
    """The real provider, events backend, one worker so /readyz speaks for every request."""
    env = provider_env(**events_env(events_server, BUS_EVENTS_LISTENER_REQUIRED="1"))
    with console_script("--backend", "events", "--events-url", events_server.url, "--workers", "1",
                        port=port, env=env) as process:
        yield process


def wait_ready(url: str, timeout: float = 10.0) -> requests.Response:
    """Poll /readyz through nginx until 200 (reply listeners connected), bounded."""
    deadline = time.monotonic() + timeout
    while True:
        response = requests.get(f"{url}/readyz", timeout=2)
        if response.status_code == 200 or time.monotonic() > deadline:
            return response
        time.sleep(0.1)


def assert_json_error(response: requests.Response, status: int, error_type=None) -> dict:
    """A JSON error body in the contract's shape, never an HTML page."""
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert response.headers["Content-Type"].startswith("application/json"), response.headers
    assert "<html" not in response.text.lower()
    error = response.json()["error"]
    assert isinstance(error["type"], str) and isinstance(error["message"], str) and error["message"]
    if error_type is not None:
        assert error["type"] == error_type, error
    return error


def run(url: str, profile: str, timeout_seconds: int, timeout: float = 30) -> requests.Response:
    body = {"profile": profile, "args": ["true"], "timeout_seconds": timeout_seconds}
    return requests.post(f"{url}/api/v1/containers/runs", json=body, headers=bearer(), timeout=timeout)


# --- nginx ---------------------------------------------------------------------

def test_nginx_serves_the_api_and_answers_its_own_errors_as_json(tmp_path, events_server, responder):
    upstream_port = free_port()
    with nginx(tmp_path, upstream_port) as url:
        with provider(events_server, upstream_port) as process:
            ready = wait_ready(url)
            assert ready.status_code == 200 and ready.json() == {"ok": True}

            # The bearer token reaches the provider: a run, the status listing it, a delete.
            created = requests.post(f"{url}/api/v1/containers/runs", json=RUN_BODY, headers=bearer(), timeout=30)
            assert created.status_code == 200, created.text
            result = created.json()
            assert result["run_id"].startswith("run_")
            assert {k: result[k] for k in ("owner_account_id", "runner_name", "image", "args", "exit_code",
                                           "stdout", "stderr", "runtime")} == {
                "owner_account_id": "acct-a", "runner_name": "responder", "image": "profile:codex",
                "args": ["sh", "-c", "printf OK"], "exit_code": 0, "stdout": "sh -c printf OK", "stderr": "",
                "runtime": {"state": "ready", "provider": "responder"}}

            status = requests.get(f"{url}/api/v1/containers/status", headers=bearer(), timeout=10)
            assert status.status_code == 200, status.text
            assert {item["id"] for item in status.json()["items"]} == {"runner-1", result["run_id"]}

            deleted = requests.delete(f"{url}/api/v1/containers/runs/{result['run_id']}", headers=bearer(),
                                      timeout=10)
            assert deleted.status_code == 200, deleted.text
            assert deleted.json() == {"deleted": True, "run_id": result["run_id"], "owner_account_id": "acct-a"}

            # Errors from the provider pass through untouched.
            anonymous = requests.get(f"{url}/api/v1/containers/status", timeout=10)
            assert_json_error(anonymous, 401, "invalid_auth")
            assert anonymous.headers["WWW-Authenticate"].startswith("Bearer")
            assert_json_error(requests.get(f"{url}/api/v1/containers/nope", headers=bearer(), timeout=10),
                              404, "not_found")

            # nginx's own answers are JSON too: a body over 1 MiB, a path it does not proxy.
            too_big = b'{"profile":"' + b"a" * (1024 * 1024) + b'"}'
            oversized = requests.post(f"{url}/api/v1/containers/runs", data=too_big, timeout=10,
                                      headers={**bearer(), "Content-Type": "application/json"})
            assert_json_error(oversized, 413, "payload_too_large")
            for path in ("/", "/api/v1/other", "/readyz/x", "/api/v1/containers"):
                assert_json_error(requests.get(f"{url}{path}", timeout=10), 404, "not_found")

            # The request id: the client's own is echoed, otherwise nginx makes one.
            echoed = requests.get(f"{url}/readyz", headers={"X-Request-Id": "req-123"}, timeout=10)
            assert echoed.headers["X-Request-Id"] == "req-123"
            assert re.fullmatch(r"[0-9a-f]{32}", requests.get(f"{url}/readyz", timeout=10).headers["X-Request-Id"])

            # A run longer than the next test's 2 s read timeout passes with the shipped one.
            slow = run(url, "sleep:3", 10)
            assert slow.status_code == 200 and slow.json()["exit_code"] == 0, slow.text

        # The provider has stopped: nginx answers 502, as JSON.
        assert process.returncode == 0, process.output
        assert_json_error(requests.get(f"{url}/readyz", timeout=10), 502, "bad_gateway")
        assert_json_error(run(url, "codex", 10), 502, "bad_gateway")


def test_runs_location_read_timeout_governs_long_runs(tmp_path, events_server, responder):
    upstream_port = free_port()
    with nginx(tmp_path, upstream_port, runs_read_timeout="2s") as url, provider(events_server, upstream_port):
        assert wait_ready(url).status_code == 200

        quick = run(url, "sleep:0", 10)
        assert quick.status_code == 200 and quick.json()["exit_code"] == 0, quick.text

        # The provider would wait 10 s + grace and answer at 4 s; nginx gives up at 2 s. The 504
        # itself shows nginx cut the run short: the provider's own answer would have been a 200.
        started = time.monotonic()
        cut = run(url, "sleep:4", 10)
        error = assert_json_error(cut, 504, "gateway_timeout")
        assert "run" in error["message"]
        assert time.monotonic() - started >= 1.5  # nginx waited its read timeout first

        # Only the runs location has the short timeout: a status still works.
        assert requests.get(f"{url}/api/v1/containers/status", headers=bearer(), timeout=10).status_code == 200


def test_shipped_timeouts_cover_the_provider_waits():
    text = NGINX_CONF.read_text()
    runs = runs_location(text)["body"]
    # max run timeout 3600 s + run grace 30 s: nginx must outwait the provider.
    assert nginx_seconds(directive(runs, "proxy_read_timeout")) > 3630
    assert nginx_seconds(directive(runs, "proxy_send_timeout")) > 3630
    assert directive(runs, "proxy_buffering") == "off"
    assert directive(runs, "proxy_pass") == "http://bus_containers_provider"
    # Elsewhere: shorter, but above the provider's default 30 s reply wait.
    server = server_level(text)
    assert 30 < nginx_seconds(directive(server, "proxy_read_timeout")) < 3630
    assert directive(server, "client_max_body_size") == "1m"
    assert directive(server, "proxy_http_version") == "1.1"
    assert directive(server, "proxy_intercept_errors") == "off"


def test_nginx_config_passes_nginx_t_with_the_shipped_values(tmp_path):
    """The file as shipped (port 80, upstream 8080) is valid nginx; only log paths moved."""
    text = replace_once(NGINX_CONF.read_text(), SHIPPED_ACCESS_LOG, str(tmp_path / "access.log"))
    site = tmp_path / "bus-containers.conf"
    site.write_text(text)
    conf = main_conf(tmp_path, site)
    check = subprocess.run([nginx_binary(), "-t", "-p", f"{tmp_path}/", "-e", f"{tmp_path}/error.log",
                            "-c", str(conf)], capture_output=True, text=True, timeout=10)
    assert check.returncode == 0, check.stderr


# --- systemd ---------------------------------------------------------------------

def read_unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def systemd_seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "": 1}
    parts = re.findall(r"(\d+)\s*(ms|sec|min|s|m|h|)", value)
    assert parts, value
    return sum(int(number) * units[unit] for number, unit in parts)


def help_text() -> str:
    result = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True, timeout=30,
                            env=provider_env())
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_unit_runs_the_console_script_hardened_and_from_the_env_file():
    unit = read_unit()
    service = unit["Service"]
    expected = {
        "EnvironmentFile": "/etc/bus/bus-api-provider-containers.env",
        "User": "bus-containers", "Group": "bus-containers",
        "Restart": "on-failure", "KillSignal": "SIGTERM",
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
        "PrivateDevices": "yes", "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes", "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "LockPersonality": "yes", "RestrictSUIDSGID": "yes", "RestrictNamespaces": "yes",
    }
    assert {key: service.get(key) for key in expected} == expected
    assert systemd_seconds(service["RestartSec"]) > 0
    assert unit["Install"]["WantedBy"] == "multi-user.target"

    # SIGTERM lets gunicorn finish in-flight requests for its graceful timeout (as configured by
    # the env example, and by default); systemd must wait longer before it kills.
    for settings in (example_settings(), load_settings({"BUS_CONTAINERS_JWT_SECRET": SECRET})):
        graceful = gunicorn_options(settings).get("graceful_timeout", GunicornConfig().graceful_timeout)
        assert systemd_seconds(service["TimeoutStopSec"]) > graceful

    command = shlex.split(service["ExecStart"])
    assert command[0] == "/opt/bus-api-provider-containers/venv/bin/bus-api-provider-containers"
    assert Path(command[0]).name == SCRIPT.name
    documented = help_text()
    for argument in command[1:]:
        if argument.startswith("--"):
            assert argument.split("=", 1)[0] in documented, argument


# README "Open files", as an operator reads it; the test holds it to the code that needs the files.
FD_FORMULA = "LimitNOFILE >= max(1000, 2 × threads) + threads + 256"


def documented_fds(threads: int) -> int:
    return max(1000, 2 * threads) + threads + 256


def test_unit_open_files_fit_the_documented_formula():
    from bus_containers_provider.serving import _fds_per_worker

    assert FD_FORMULA in (ROOT / "README.md").read_text()
    limit = int(read_unit()["Service"]["LimitNOFILE"])
    for threads in (1, 32, 499, 500, 501, 2000):
        settings = load_settings({"BUS_CONTAINERS_JWT_SECRET": SECRET, "BUS_CONTAINERS_THREADS": str(threads)})
        assert _fds_per_worker(settings) == documented_fds(threads), threads
    # The unit fits what the env example configures, and the largest figure the README promises.
    assert limit >= documented_fds(example_settings().threads)
    assert limit >= documented_fds(5000)
    assert "fits up to 5,000 threads" in (ROOT / "README.md").read_text()


def test_unit_holds_no_secret():
    for number, line in enumerate(UNIT.read_text().splitlines(), 1):
        assert not re.search(r"(JWT_SECRET|BUS_API_TOKEN)\s*=", line), f"line {number}: {line}"


def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:  # the structural checks above still apply
        return
    copy = tmp_path / UNIT.name
    text = UNIT.read_text()
    shipped = "ExecStart=/opt/bus-api-provider-containers/venv/bin/bus-api-provider-containers"
    assert text.count(shipped) == 1
    copy.write_text(text.replace(shipped, f"ExecStart={SCRIPT}"))
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=30)
    complaints = [line for line in (result.stdout + result.stderr).splitlines()
                  if line.strip() and "bus-containers" not in line]  # the user need not exist here
    assert not complaints, complaints


# --- environment example ---------------------------------------------------------------------

def read_env_example():
    """(active assignments, commented-out assignments) of the example file."""
    active, commented = {}, {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if match := re.fullmatch(r"([A-Z][A-Z0-9_]*)=(.*)", line):
            active[match[1]] = match[2]
        elif match := re.fullmatch(r"#\s*([A-Z][A-Z0-9_]*)=(.*)", line):
            commented[match[1]] = match[2]
    return active, commented


def unit_environment() -> dict:
    """The unit's Environment= assignments, every line of them (configparser keeps only the last)."""
    found = {}
    for line in UNIT.read_text().splitlines():
        if match := re.fullmatch(r"Environment=(.*)", line.strip()):
            found.update(assignment.split("=", 1) for assignment in shlex.split(match[1]))
    return found


def example_settings():
    """What the unit starts: its environment, the env example over it (systemd's order), the credential laid
    out where %d points, placeholders filled in by test values; loaded like the provider does."""
    active, _ = read_env_example()
    credential, _ = read_unit()["Service"]["LoadCredential"].split(":", 1)
    with tempfile.TemporaryDirectory() as directory:
        (Path(directory) / credential).write_text("events-token\n")
        environment = {name: value.replace("%d", directory) for name, value in unit_environment().items()}
        return load_settings({**environment, **active, "BUS_CONTAINERS_JWT_SECRET": SECRET,
                              "BUS_EVENTS_API_URL": "http://127.0.0.1:9"})


def test_env_example_documents_every_variable_with_production_values():
    active, commented = read_env_example()
    for name in {*CONTRACT_VARIABLES, *ENVIRONMENT, *SECRET_VARIABLES, "BUS_EVENTS_LISTENER_DOWN_GRACE"}:
        assert name in active or name in commented, name
    # The fallback secret, and the Events token's other forms: the unit hands it over as a credential.
    assert set(commented) == {"BUS_API_JWT_SECRET", "BUS_EVENTS_TOKEN_FILE", "BUS_API_TOKEN"}
    for name in ("BUS_CONTAINERS_BACKEND", "BUS_CONTAINERS_USAGE_BACKEND", "BUS_CONTAINERS_BILLING_BACKEND"):
        assert active[name] == "events", name
    assert active["BUS_EVENTS_LISTENER_REQUIRED"] == "1" and active["BUS_EVENTS_LISTENER_RETRY"] == "1"
    # Secrets are obvious placeholders, never real values.
    for value in (active["BUS_CONTAINERS_JWT_SECRET"], commented["BUS_API_TOKEN"], commented["BUS_API_JWT_SECRET"]):
        assert value == PLACEHOLDER


def test_unit_hands_the_events_token_over_as_a_credential_never_through_the_environment():
    credential, source = read_unit()["Service"]["LoadCredential"].split(":", 1)
    assert source == "/etc/bus/bus-api-provider-containers.events-token"
    assert unit_environment()["BUS_EVENTS_TOKEN_FILE"] == f"%d/{credential}"
    assert f"{source})" in UNIT.read_text()  # the install steps create it
    active, _ = read_env_example()
    assert "BUS_API_TOKEN" not in active and "BUS_EVENTS_TOKEN_FILE" not in active
    settings = example_settings()
    assert settings.events_token_file.endswith(f"/{credential}") and settings.api_token is None


def test_env_example_is_a_valid_configuration_once_filled_in():
    active, _ = read_env_example()
    # Unchanged, the placeholder secret is refused: nobody runs with it by accident.
    with pytest.raises(ConfigError, match="BUS_CONTAINERS_JWT_SECRET"):
        load_settings(active)

    settings = example_settings()
    assert (settings.backend, settings.usage_backend, settings.billing_backend) == ("events",) * 3
    assert settings.listener_required and settings.listener_retry

    # nginx outwaits the provider as configured by the example.
    text = NGINX_CONF.read_text()
    runs_timeout = nginx_seconds(directive(runs_location(text)["body"], "proxy_read_timeout"))
    assert runs_timeout > settings.max_run_timeout + settings.run_timeout_grace
    assert nginx_seconds(directive(server_level(text), "proxy_read_timeout")) > settings.request_timeout
    assert settings.addr == SHIPPED_UPSTREAM.split()[1].rstrip(";")
