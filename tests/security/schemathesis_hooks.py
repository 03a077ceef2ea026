"""schemathesis hooks for the full run (SCHEMATHESIS_HOOKS=schemathesis_hooks).

Each hook corrects the fuzzer where it misreads a documented behaviour, never the provider:

- A reused Idempotency-Key replays the first answer (CONTRACT §7), so a generated key that
  repeats across different requests makes a replayed run id look like a lost resource.
  Generated keys are made unique (still within the documented pattern).
"""
import uuid

import schemathesis


@schemathesis.hook
def map_headers(ctx, headers):
    if headers and "Idempotency-Key" in headers:
        headers["Idempotency-Key"] = f"k-{uuid.uuid4().hex}"
    return headers

