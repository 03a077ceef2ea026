"""Console script: serve the provider under gunicorn, or mint a local development token."""
import argparse
import os
import sys
import textwrap

from .config import (
    BACKENDS, BILLING_BACKENDS, PUBLIC_AUDIENCE, USAGE_BACKENDS, ConfigError, load_secret, load_settings,
    parse_duration,
)
from .values import BOOLEAN_SYNTAX, DURATION_SYNTAX

PROG = "bus-api-provider-containers"


def _wrapped(name: str, text: str) -> str:
    return textwrap.fill(text, width=94, initial_indent=f"  {name:<10}", subsequent_indent=" " * 12)


ENVIRONMENT_HELP = f"""\
environment:
  BUS_CONTAINERS_JWT_SECRET       HS256 key for caller tokens (both audiences), at least
                                  32 bytes; 'base64:XYZ' is decoded. Fallback: BUS_API_JWT_SECRET
  BUS_API_TOKEN                   the provider's bearer token for the Events API (needed by
                                  any events backend; never pass it as a flag)
  BUS_EVENTS_TOKEN_FILE           a file holding that token, which wins over BUS_API_TOKEN; read
                                  again when it changes or the Events API answers 401 or 403
  BUS_EVENTS_LISTENER_REQUIRED    BOOLEAN: readiness waits for every reply listener (default off)
  BUS_EVENTS_LISTENER_RETRY       BOOLEAN: reconnect reply listeners with exponential backoff
                                  (default off) between
  BUS_EVENTS_LISTENER_RETRY_MIN   (default 1s) and
  BUS_EVENTS_LISTENER_RETRY_MAX   (default 30s); a stream refused with 401 or 403 waits the most
  BUS_EVENTS_LISTENER_DOWN_GRACE  how long waiting requests survive a dropped reply stream
                                  before failing 503 (default 3s)
  BUS_CONTAINERS_SHUTDOWN_GRACE   on SIGTERM, how long in-flight runs may finish (default 60s)
  BUS_EVENTS_LISTENER_IDLE_TIMEOUT  a silent reply stream is reopened, make-before-break,
                                  after this long (default 60s)
  BUS_CONTAINERS_RESERVED_THREADS request threads per worker that runs never take, kept for
                                  status, reads, deletes and /readyz (default threads/8, at least 2)
  Every flag also reads the variable named in its help; the flag wins.

values:
{_wrapped("DURATION", DURATION_SYNTAX)}
{_wrapped("BOOLEAN", BOOLEAN_SYNTAX)}

commands:
  token   mint a local development token: %(prog)s token --subject ACCOUNT --scope "..."
"""


class _Parser(argparse.ArgumentParser):
    """Start-up errors are one line (the usage is one --help away), exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


class _Duration:
    """argparse type for durations; the error names the accepted forms."""

    __name__ = "duration"

    def __call__(self, text):
        try:
            return parse_duration(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None


def _serve_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=ENVIRONMENT_HELP,
        description="Serve the Bus container API provider under gunicorn (gthread).",
    )
    add = parser.add_argument
    add("--addr", metavar="HOST:PORT", help="listen address (BUS_CONTAINERS_ADDR, default 127.0.0.1:8080)")
    add("--backend", choices=BACKENDS, help="container backend (BUS_CONTAINERS_BACKEND, default static)")
    add("--events-url", metavar="URL", help="Bus Events API root (BUS_EVENTS_API_URL)")
    add("--usage-backend", choices=USAGE_BACKENDS,
        help="usage recording (BUS_CONTAINERS_USAGE_BACKEND, default none)")
    add("--billing-backend", choices=BILLING_BACKENDS,
        help="entitlement check before runs (BUS_CONTAINERS_BILLING_BACKEND, default none)")
    add("--request-timeout", type=_Duration(), metavar="DURATION",
        help="reply wait for non-run requests (BUS_CONTAINERS_REQUEST_TIMEOUT, default 30s)")
    add("--run-timeout-grace", type=_Duration(), metavar="DURATION",
        help="added to timeout_seconds for a run's reply wait (BUS_CONTAINERS_RUN_TIMEOUT_GRACE, default 30s)")
    add("--max-run-timeout", type=_Duration(), metavar="DURATION",
        help="largest accepted timeout_seconds (BUS_CONTAINERS_MAX_RUN_TIMEOUT, default 3600s)")
    add("--workers", type=int, metavar="N",
        help="gunicorn worker processes (BUS_CONTAINERS_WORKERS, default 2; 1 with the static backend)")
    add("--threads", type=int, metavar="N", help="request threads per worker (BUS_CONTAINERS_THREADS, default 32)")
    add("--max-runs-per-account", type=int, metavar="N",
        help="runs one account may have in flight at once, 0 = no limit "
             "(BUS_CONTAINERS_MAX_RUNS_PER_ACCOUNT, default 4)")
    add("--max-output-bytes", type=int, metavar="N",
        help="cap on each of stdout and stderr in a run result (BUS_CONTAINERS_MAX_OUTPUT_BYTES, default 1048576)")
    add("--idempotency-ttl", type=_Duration(), metavar="DURATION",
        help="how long an Idempotency-Key is remembered (BUS_CONTAINERS_IDEMPOTENCY_TTL, default 24h)")
    add("--run-retention", type=_Duration(), metavar="DURATION",
        help="how long a finished run record is kept (BUS_CONTAINERS_RUN_RETENTION, default 24h)")
    add("--max-wait", type=_Duration(), metavar="DURATION",
        help="the longest Prefer: wait granted (BUS_CONTAINERS_MAX_WAIT, default 30s)")
    add("--state-url", metavar="URL",
        help="shared store for run controls, redis:// or rediss:// (BUS_CONTAINERS_STATE_URL, default in-process)")
    add("--metrics-addr", metavar="HOST:PORT",
        help="serve Prometheus /metrics on this address (BUS_CONTAINERS_METRICS_ADDR, default off)")
    return parser


def _token_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=f"{PROG} token",
        description="Print a local development token signed with BUS_CONTAINERS_JWT_SECRET.",
    )
    parser.add_argument("--subject", required=True, help="account id (the token's sub)")
    parser.add_argument("--scope", required=True, help='space-separated scopes, e.g. "container:read container:run"')
    parser.add_argument("--audience", default=PUBLIC_AUDIENCE, help=f"token audience (default {PUBLIC_AUDIENCE})")
    parser.add_argument("--ttl", type=_Duration(), default=3600.0, metavar="DURATION", help="lifetime (default 1h)")
    return parser


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def mint(argv) -> int:
    from .auth import mint_token

    args = _token_parser().parse_args(argv)
    try:
        secret = load_secret(os.environ)
    except ConfigError as exc:
        return _fail(str(exc))
    if not args.subject.strip():
        return _fail("--subject must not be empty")
    print(mint_token(secret, args.subject, args.scope, args.audience, args.ttl))
    return 0


def serve(argv) -> int:
    args = _serve_parser().parse_args(argv)
    try:
        settings = load_settings(os.environ, **vars(args))
    except ConfigError as exc:
        return _fail(str(exc))
    from .serving import ProviderApplication

    ProviderApplication(settings).run()
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["token"]:
        return mint(argv[1:])
    return serve(argv)


if __name__ == "__main__":
    sys.exit(main())
