"""The shipped monitoring files: deploy/grafana, deploy/prometheus.

Every metric a dashboard panel or an alert queries must be one the provider
exports; every query must be valid PromQL; the alert rules are checked and
unit-tested with promtool (installed by tools/ensure-tools.sh, which
`make test` runs).
"""
import json
import re
import shutil
import subprocess

from prometheus_client.metrics import MetricWrapperBase

from processes import ROOT

DASHBOARD = ROOT / "deploy" / "grafana" / "bus-containers.json"
PROMETHEUS = ROOT / "deploy" / "prometheus"
ALERTS = PROMETHEUS / "bus-containers-alerts.yml"
ALERT_TESTS = ROOT / "tests" / "prometheus" / "alerts_test.yml"
NGINX_CONF = ROOT / "deploy" / "nginx" / "bus-containers.conf"
METRIC_NAME = re.compile(r"\b(bus_containers_[a-z0-9_]+)")
# What Grafana substitutes before a query reaches Prometheus.
TEMPLATE = {"$__rate_interval": "5m", "$job": "bus-containers", "$instance": ".*"}


def exported_samples() -> set:
    """Every sample name the provider's series produce in the text format."""
    from bus_containers_provider.metrics import series

    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    names = set()
    for metric in vars(series).values():
        if isinstance(metric, MetricWrapperBase):
            for family in metric.describe():
                names.update(family.name + suffix for suffix in suffixes[family.type])
    return names


def dashboard_queries() -> list:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    queries += [variable["definition"] for variable in dashboard["templating"]["list"] if "definition" in variable]
    return queries


def alert_exprs() -> list:
    import yaml

    rules = yaml.safe_load(ALERTS.read_text())
    return [rule for group in rules["groups"] for rule in group["rules"]]


def promtool(*args) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    assert binary, "promtool is not installed: run tools/ensure-tools.sh promtool (make test does)"
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=60)


def test_every_metric_the_dashboard_queries_is_exported():
    exported = exported_samples()
    queried = {name for query in dashboard_queries() for name in METRIC_NAME.findall(query)}
    assert queried and queried <= exported, queried - exported
    # What an operator comes to the dashboard for (issue 13): each has a panel.
    for needed in ("bus_containers_http_requests_total", "bus_containers_http_request_duration_seconds_bucket",
                   "bus_containers_runs_in_flight", "bus_containers_runs_total",
                   "bus_containers_events_reply_seconds_bucket", "bus_containers_events_listener_connected",
                   "bus_containers_usage_records_pending", "bus_containers_runs_detached_in_flight",
                   "bus_containers_runs_adopted_total"):
        assert needed in queried, needed


def test_dashboard_panels_are_well_formed():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "bus-containers" and dashboard["schemaVersion"] >= 36
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24


def test_dashboard_queries_are_valid_promql(tmp_path):
    # promtool has no query checker of its own; recording rules are checked as PromQL.
    rules = []
    for n, query in enumerate(dashboard_queries()):
        for variable, value in TEMPLATE.items():
            query = query.replace(variable, value)
        if query.startswith("label_values("):
            query = re.match(r"label_values\((.+), \w+\)$", query).group(1)
        rules.append({"record": f"dashboard:query_{n}", "expr": query})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_check_and_their_unit_tests_pass():
    names = {rule["alert"] for rule in alert_exprs()}
    assert {"BusContainersListenerDown", "BusContainersUsageRecordsLost", "BusContainersHighErrorRatio"} <= names
    queried = {name for rule in alert_exprs() for name in METRIC_NAME.findall(rule["expr"])}
    assert queried <= exported_samples(), queried - exported_samples()
    listener = next(rule for rule in alert_exprs() if rule["alert"] == "BusContainersListenerDown")
    assert listener["for"] == "1m"

    checked = promtool("check", "rules", str(ALERTS))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", str(ALERT_TESTS))
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr
    config = promtool("check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert config.returncode == 0, config.stdout + config.stderr


def test_nginx_does_not_expose_metrics():
    conf = NGINX_CONF.read_text()
    assert "metrics" not in conf
    # Anything the locations do not name is nginx's own JSON 404.
    assert re.search(r"location / \{\s*default_type application/json;\s*return 404 ", conf)
