"""schemathesis hooks for the full run (SCHEMATHESIS_HOOKS=schemathesis_hooks).

Each hook corrects the fuzzer where it misreads a documented behaviour, never the provider:

- A reused Idempotency-Key replays the first answer (CONTRACT §7), so a generated key that
  repeats across different requests makes a replayed run id look like a lost resource.
  Generated keys are made unique (still within the documented pattern).
- `timeout_seconds` given as an integral float (`148.0`) is a JSON integer to JSON Schema but a
  400 from the provider, which reads it strictly; it is sent as `148`. (A disagreement between the
  server and JSON Schema, reported for the request schema; drop this hook once the server takes it.)
"""
import uuid

import schemathesis


@schemathesis.hook
def map_headers(ctx, headers):
    if headers and "Idempotency-Key" in headers:
        headers["Idempotency-Key"] = f"k-{uuid.uuid4().hex}"
    return headers


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    # Only the cases that need it are touched: editing a case makes schemathesis re-classify it.
    body = case.body
    timeout = body.get("timeout_seconds") if isinstance(body, dict) else None
    if isinstance(timeout, float) and timeout.is_integer():
        case.body = dict(body, timeout_seconds=int(timeout))
