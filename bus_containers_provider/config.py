"""Settings from flags and the environment, validated once at start-up."""
import base64
import binascii
import dataclasses
import os
from typing import Mapping, Optional

from .credentials import TokenFileError, read_token_file
from .values import parse_bool, parse_duration

PUBLIC_AUDIENCE = "ai.hg.fi/api"
INTERNAL_AUDIENCE = "ai.hg.fi/internal"

BACKENDS = ("static", "events")
USAGE_BACKENDS = ("none", "events", "memory")
BILLING_BACKENDS = ("none", "events")

# RFC 8725 §3.5: an HMAC key must carry at least as many bits as the hash.
MIN_SECRET_BYTES = 32

# §7: per-account in-flight runs, output cap per stream, idempotency memory.
DEFAULT_MAX_RUNS_PER_ACCOUNT = 4
DEFAULT_MAX_OUTPUT_BYTES = 1024 * 1024
DEFAULT_IDEMPOTENCY_TTL = 24 * 3600.0
# §9: finished run records, and the longest Prefer: wait.
DEFAULT_RUN_RETENTION = 24 * 3600.0
DEFAULT_MAX_WAIT = 30.0
STATE_SCHEMES = ("redis://", "rediss://")


class ConfigError(ValueError):
    """A setting is missing or has a value the provider cannot run with."""


def decode_secret(value: str) -> bytes:
    """`base64:XYZ` is decoded; any other value is the key as UTF-8 text."""
    if value.startswith("base64:"):
        try:
            return base64.b64decode(value[len("base64:"):], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError("is not valid base64") from exc
    return value.encode("utf-8")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything the provider needs to serve; secrets never appear in repr."""

    jwt_secret: bytes = dataclasses.field(repr=False)
    addr: str = "127.0.0.1:8080"
    backend: str = "static"
    events_url: Optional[str] = None
    usage_backend: str = "none"
    billing_backend: str = "none"
    request_timeout: float = 30.0
    run_timeout_grace: float = 30.0
    max_run_timeout: float = 3600.0
    workers: Optional[int] = None
    threads: int = 32
    api_token: Optional[str] = dataclasses.field(default=None, repr=False)
    # A file holding the Events token instead; it wins over api_token (credentials.py reads it).
    events_token_file: Optional[str] = None
    listener_required: bool = False
    listener_retry: bool = False
    listener_retry_min: float = 1.0
    listener_retry_max: float = 30.0
    # How long requests keep waiting on a reply stream that dropped before
    # they fail; short, so a dead stream never holds a run for its whole timeout.
    listener_down_grace: float = 3.0
    # SIGTERM lets in-flight runs finish for this long before workers are stopped.
    shutdown_grace: float = 60.0
    # An idle reply stream is reopened (make-before-break) after this long; the API sends no heartbeat.
    listener_idle_timeout: float = 60.0
    max_runs_per_account: int = DEFAULT_MAX_RUNS_PER_ACCOUNT
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES
    idempotency_ttl: float = DEFAULT_IDEMPOTENCY_TTL
    run_retention: float = DEFAULT_RUN_RETENTION
    max_wait: float = DEFAULT_MAX_WAIT
    # A redis:// URL may carry a password: never in repr or logs.
    state_url: Optional[str] = dataclasses.field(default=None, repr=False)
    metrics_addr: Optional[str] = None
    # Request threads per worker that runs may never take (None: derived from threads).
    reserved_threads: Optional[int] = None

    @property
    def uses_events(self) -> bool:
        return "events" in (self.backend, self.usage_backend, self.billing_backend)

    @property
    def effective_workers(self) -> int:
        # Static runs live in process memory, so one worker keeps them coherent.
        if self.workers is not None:
            return self.workers
        return 1 if self.backend == "static" else 2

    @property
    def effective_reserved_threads(self) -> int:
        # An eighth of the threads, at least 2, and never all of them: one thread always runs.
        if self.reserved_threads is not None:
            return min(self.reserved_threads, self.threads - 1)
        return min(max(2, self.threads // 8), self.threads - 1)

    def run_wait(self, timeout_seconds: Optional[int]) -> float:
        """How long a run's answer is waited for: 0 or absent means the longest run we accept."""
        return (timeout_seconds or self.max_run_timeout) + self.run_timeout_grace

    @property
    def run_capacity(self) -> int:
        """Runs one worker holds at once; the other threads stay free for everything else."""
        return self.threads - self.effective_reserved_threads

    def redacted(self) -> dict:
        """The effective configuration, safe to log."""
        shown = dataclasses.asdict(self)
        shown["jwt_secret"] = "<redacted>"
        shown["api_token"] = "<redacted>" if self.api_token else None
        shown["state_url"] = _redact_url(self.state_url)
        return shown

    def validate(self) -> "Settings":
        _choice("--backend (BUS_CONTAINERS_BACKEND)", self.backend, BACKENDS)
        _choice("--usage-backend (BUS_CONTAINERS_USAGE_BACKEND)", self.usage_backend, USAGE_BACKENDS)
        _choice("--billing-backend (BUS_CONTAINERS_BILLING_BACKEND)", self.billing_backend, BILLING_BACKENDS)
        if len(self.jwt_secret) < MIN_SECRET_BYTES:
            raise ConfigError(f"the JWT secret must be at least {MIN_SECRET_BYTES} bytes (RFC 8725 §3.5)")
        if self.uses_events and not self.events_url:
            raise ConfigError("an events backend needs --events-url (or BUS_EVENTS_API_URL)")
        if self.uses_events and self.events_token_file:
            try:
                read_token_file(self.events_token_file)
            except TokenFileError as exc:
                raise ConfigError(f"BUS_EVENTS_TOKEN_FILE: {exc}") from None
        elif self.uses_events and not self.api_token:
            raise ConfigError("an events backend needs BUS_API_TOKEN (or BUS_EVENTS_TOKEN_FILE) in the environment")
        for flag, value in (("--workers", self.workers), ("--threads", self.threads),
                            ("--max-output-bytes", self.max_output_bytes)):
            if value is not None and value < 1:
                raise ConfigError(f"{flag} must be at least 1")
        for flag, value in (("--max-runs-per-account", self.max_runs_per_account),
                            ("BUS_CONTAINERS_RESERVED_THREADS", self.reserved_threads)):
            if value is not None and value < 0:
                raise ConfigError(f"{flag} must not be negative")
        for flag, value in (
            ("--request-timeout", self.request_timeout),
            ("--max-run-timeout", self.max_run_timeout),
            ("BUS_EVENTS_LISTENER_RETRY_MIN", self.listener_retry_min),
            ("BUS_EVENTS_LISTENER_DOWN_GRACE", self.listener_down_grace),
            ("BUS_EVENTS_LISTENER_IDLE_TIMEOUT", self.listener_idle_timeout),
            ("--idempotency-ttl", self.idempotency_ttl),
            ("--run-retention", self.run_retention),
        ):
            if value <= 0:
                raise ConfigError(f"{flag} must be greater than zero")
        if self.listener_retry_max < self.listener_retry_min:
            raise ConfigError("BUS_EVENTS_LISTENER_RETRY_MAX must not be below BUS_EVENTS_LISTENER_RETRY_MIN")
        if self.shutdown_grace < 0:
            raise ConfigError("BUS_CONTAINERS_SHUTDOWN_GRACE must not be negative")
        if self.state_url is not None and not self.state_url.startswith(STATE_SCHEMES):
            raise ConfigError("--state-url (BUS_CONTAINERS_STATE_URL) must be a redis:// or rediss:// URL")
        _host_port(self.addr)
        if self.metrics_addr is not None:
            _host_port(self.metrics_addr, "--metrics-addr (BUS_CONTAINERS_METRICS_ADDR)")
        return self


def _choice(flag: str, value: str, accepted: tuple) -> None:
    if value not in accepted:
        raise ConfigError(f"{flag} must be one of {', '.join(accepted)} (got {value!r})")


def _host_port(addr: str, flag: str = "--addr (BUS_CONTAINERS_ADDR)") -> tuple:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{flag} must be HOST:PORT (got {addr!r})")
    return host, int(port)


def _redact_url(url: Optional[str]) -> Optional[str]:
    """The URL without its credentials."""
    if not url:
        return url
    scheme, sep, rest = url.partition("://")
    userinfo, at, hostpart = rest.rpartition("@")
    return f"{scheme}{sep}<redacted>@{hostpart}" if at else url


def trim_events_url(url: Optional[str]) -> Optional[str]:
    """The Events API root, whether or not the URL already names /api/v1/events."""
    if not url:
        return None
    url = url.rstrip("/")
    suffix = "/api/v1/events"
    return url[: -len(suffix)] if url.endswith(suffix) else url


# Environment variable -> (settings field, parser). Flags use the same parsers.
ENVIRONMENT = {
    "BUS_CONTAINERS_ADDR": ("addr", str),
    "BUS_CONTAINERS_BACKEND": ("backend", str),
    "BUS_EVENTS_API_URL": ("events_url", str),
    "BUS_CONTAINERS_USAGE_BACKEND": ("usage_backend", str),
    "BUS_CONTAINERS_BILLING_BACKEND": ("billing_backend", str),
    "BUS_CONTAINERS_REQUEST_TIMEOUT": ("request_timeout", parse_duration),
    "BUS_CONTAINERS_RUN_TIMEOUT_GRACE": ("run_timeout_grace", parse_duration),
    "BUS_CONTAINERS_MAX_RUN_TIMEOUT": ("max_run_timeout", parse_duration),
    "BUS_CONTAINERS_WORKERS": ("workers", int),
    "BUS_CONTAINERS_THREADS": ("threads", int),
    "BUS_API_TOKEN": ("api_token", str),
    "BUS_EVENTS_TOKEN_FILE": ("events_token_file", str),
    "BUS_EVENTS_LISTENER_REQUIRED": ("listener_required", parse_bool),
    "BUS_EVENTS_LISTENER_RETRY": ("listener_retry", parse_bool),
    "BUS_EVENTS_LISTENER_RETRY_MIN": ("listener_retry_min", parse_duration),
    "BUS_EVENTS_LISTENER_RETRY_MAX": ("listener_retry_max", parse_duration),
    "BUS_EVENTS_LISTENER_DOWN_GRACE": ("listener_down_grace", parse_duration),
    "BUS_CONTAINERS_SHUTDOWN_GRACE": ("shutdown_grace", parse_duration),
    "BUS_EVENTS_LISTENER_IDLE_TIMEOUT": ("listener_idle_timeout", parse_duration),
    "BUS_CONTAINERS_MAX_RUNS_PER_ACCOUNT": ("max_runs_per_account", int),
    "BUS_CONTAINERS_MAX_OUTPUT_BYTES": ("max_output_bytes", int),
    "BUS_CONTAINERS_IDEMPOTENCY_TTL": ("idempotency_ttl", parse_duration),
    "BUS_CONTAINERS_RUN_RETENTION": ("run_retention", parse_duration),
    "BUS_CONTAINERS_MAX_WAIT": ("max_wait", parse_duration),
    "BUS_CONTAINERS_STATE_URL": ("state_url", str),
    "BUS_CONTAINERS_METRICS_ADDR": ("metrics_addr", str),
    "BUS_CONTAINERS_RESERVED_THREADS": ("reserved_threads", int),
}

SECRET_VARIABLES = ("BUS_CONTAINERS_JWT_SECRET", "BUS_API_JWT_SECRET")


def load_secret(env: Mapping[str, str]) -> bytes:
    """The HS256 key, from the first secret variable that is set."""
    for name in SECRET_VARIABLES:
        if env.get(name):
            try:
                secret = decode_secret(env[name])
            except ValueError as exc:
                raise ConfigError(f"{name} {exc}") from exc
            if len(secret) < MIN_SECRET_BYTES:
                raise ConfigError(f"{name} must be at least {MIN_SECRET_BYTES} bytes (RFC 8725 §3.5)")
            return secret
    raise ConfigError(f"{SECRET_VARIABLES[0]} is not set (fallback {SECRET_VARIABLES[1]})")


def load_settings(env: Optional[Mapping[str, str]] = None, **overrides) -> Settings:
    """Settings from the environment, then flag overrides, validated."""
    env = os.environ if env is None else env
    values = {}
    for variable, (field, parse) in ENVIRONMENT.items():
        raw = env.get(variable)
        # Empty is unset for text; a duration, switch or number left empty is refused like any bad value.
        if raw is None or (raw == "" and parse is str):
            continue
        try:
            values[field] = parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{variable}: {exc}") from exc
    values.update({key: value for key, value in overrides.items() if value is not None})
    values["events_url"] = trim_events_url(values.get("events_url"))
    return Settings(jwt_secret=load_secret(env), **values).validate()
