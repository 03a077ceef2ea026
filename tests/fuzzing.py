"""How hard the fuzz tests push: fixed in `make test`, scaled up and reseeded by `make fuzz`.

`make test` runs every Hypothesis test with a fixed seed (`--hypothesis-seed` in setup.cfg)
and schemathesis with FUZZ_SEED's default, so a failure there is reproducible as is.
`make fuzz` sets FUZZ_SCALE (examples multiplied) and FUZZ_SEED (a fresh seed per run).
"""
import os

SCALE = float(os.environ.get("FUZZ_SCALE", "1"))
SEED = int(os.environ.get("FUZZ_SEED", "20261201"))


def examples(count: int) -> int:
    """`count` examples, times FUZZ_SCALE."""
    return max(1, int(count * SCALE))
