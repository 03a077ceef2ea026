"""schemathesis with every check (`--checks all`) against the live provider, for both audiences.

The installed console script (static backend) under gunicorn; the schemathesis CLI loads
the provider's own OpenAPI document and runs its examples, coverage, fuzzing and (public
routes, through the document's links) stateful phases with a fixed seed. Every check is on:
server errors, status codes, content types, headers and bodies as documented, schema-valid
requests accepted and schema-invalid ones refused, a missing token refused, resources
created by a run readable and gone after their deletion.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

import processes
from conftest import ALL_PUBLIC_SCOPES, INTERNAL, bearer
from fuzzing import SEED, examples

HERE = Path(__file__).resolve().parent
SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"

AUDIENCES = {
    # Public token: the public routes and the two without auth; internal token: the runner routes.
    "public": (bearer(scope=ALL_PUBLIC_SCOPES), r"^/(api/v1/|readyz)", "examples,coverage,fuzzing,stateful"),
    # The runner routes link to nothing, so there is no stateful phase for them.
    "internal": (bearer(scope="container:admin", audience=INTERNAL), r"^/api/internal/",
                 "examples,coverage,fuzzing"),
}


@pytest.fixture(scope="module")
def live():
    with processes.console_script("--backend", "static") as process:
        yield process


# The campaign is CPU-bound: with both cores busy it ran past the suite's default 120 s.
# Its bound is the campaign's own, below.
@pytest.mark.timeout(660)
@pytest.mark.parametrize("audience", sorted(AUDIENCES))
def test_every_check_passes(live, audience, tmp_path):
    headers, paths, phases = AUDIENCES[audience]
    # The document itself takes a public token (CONTRACT §2 exempts only /readyz): fetch it once.
    document = tmp_path / "openapi.json"
    document.write_bytes(requests.get(f"{live.url}/api/v1/containers/openapi.json", headers=bearer(),
                                      timeout=10).content)
    command = [
        str(SCHEMATHESIS), "--config-file", str(HERE / "schemathesis.toml"), "--no-color",
        "run", str(document), "--url", live.url,
        "--checks", "all", "--max-examples", str(examples(200)), "--seed", str(SEED),
        "--phases", phases, "--include-path-regex", paths,
        "-H", f"Authorization: {headers['Authorization']}",
        "--generation-database", "none", "--workers", "1", "--request-timeout", "10",
    ]
    env = dict(os.environ, SCHEMATHESIS_HOOKS="schemathesis_hooks",
               PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    # cwd: schemathesis keeps a cache directory where it runs.
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-12000:] + result.stderr[-3000:]
    assert "No tests were run" not in result.stdout
    # The token never reaches the output (schemathesis filters it; the provider never echoes it).
    assert headers["Authorization"].split()[1] not in result.stdout
