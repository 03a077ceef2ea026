"""The baseline: a bare Flask endpoint answering a run-shaped JSON body, nothing else."""
from flask import Flask, request

app = Flask(__name__)


@app.post("/api/v1/containers/runs")
def run():
    body = request.get_json()
    return {"run_id": "run_bare", "owner_account_id": "bench", "runner_name": "bare", "image": "alpine",
            "args": body.get("command", []), "exit_code": 0, "stdout": "", "stderr": "", "duration_ms": 0,
            "runtime": {"state": "ready", "provider": "bare"}}
