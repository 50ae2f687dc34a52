"""The alert rules and the Grafana dashboard only name metrics a running broker really exposes;
the Helm chart takes every Redis topology the broker supports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from service.config.redis_url import STORE_SCHEMES
from service.keys import new_api_key
from tests.support import ServeProcess

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
CHART = ROOT / "helm" / "monogoto-broker"
CHART_ALERTS = CHART / "files" / "alerts.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "monogoto-broker.json"

# Metrics from kube-state-metrics, not from the broker: the no-ready-replica alert needs them.
KUBE_STATE_METRICS = {"kube_deployment_status_replicas_available", "kube_deployment_spec_replicas"}
# Labels Prometheus adds to every scraped series on Kubernetes, and kube-state-metrics' own.
TARGET_LABELS = {"namespace", "pod", "job", "instance", "deployment"}
_PROMQL_WORDS = {
    *("by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool"),
    *("and", "or", "unless", "inf", "nan"),
}
_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gauge": ("",),
}


def metric_names(expression: str) -> set[str]:
    """The metric names a PromQL expression (or Grafana query) selects."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expression)  # strings
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)  # Grafana variables
    names: set[str] = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(\s*\()?", text):
        name, call = match.groups()
        if call is None and name.lower() not in _PROMQL_WORDS and not re.fullmatch(r"\d+\w*", name):
            names.add(name)
    return names


def label_names(expression: str) -> set[str]:
    """The label names an expression matches on or aggregates by."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expression)
    names = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"\"", text))
    for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", text):
        names.update(name.strip() for name in group.split(",") if name.strip())
    return names


def alert_expressions() -> dict[str, str]:
    """Alert name -> expression, from deploy/prometheus/alerts.yaml."""
    rules = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return {
        rule["alert"]: rule["expr"]
        for group in rules["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }


def dashboard_expressions() -> dict[str, str]:
    """Panel title (or variable name) -> query, from the Grafana dashboard."""
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    queries = {
        f"{panel['title']} [{target['refId']}]": target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    }
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"]
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
            queries[f"${variable['name']}"] = inner.group(1) if inner else query
    return queries


@pytest.fixture(scope="module")
def scrape(
    tmp_path_factory: pytest.TempPathFactory, simulator_url: str, simulator_users: dict[str, str]
) -> str:
    """The /metrics text of a `serve` process after a token request and a bad caller."""
    directory = tmp_path_factory.mktemp("deploy-files")
    key, digest = new_api_key()
    config = {
        "redis_url": "memory://",
        "upstream": {"base_url": simulator_url, "dialect": "v1"},
        "accounts": {
            "fleet": {"username": "ops@example.com", "password": simulator_users["ops@example.com"]}
        },
        "callers": {"tests": {"api_key_sha256": digest, "accounts": ["*"]}},
    }
    config_path = directory / "config.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    server = ServeProcess(config_path, directory)
    try:
        server.wait_until_ok("/readyz")
        with httpx.Client(base_url=server.url, timeout=30.0) as http:
            token = http.get("/v1/accounts/fleet/token", headers={"Authorization": f"Bearer {key}"})
            assert token.status_code == 200, token.text
            assert http.get("/v1/accounts/fleet/token").status_code == 401
            text = http.get("/metrics").text
    finally:
        server.kill()
    return text


@pytest.fixture(scope="module")
def exposed_metrics(scrape: str) -> set[str]:
    """Every sample name the broker exposes."""
    names: set[str] = set()
    for family in text_string_to_metric_families(scrape):
        names.update(sample.name for sample in family.samples)
        # A labelled metric without samples yet still names itself in # TYPE.
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ()))
    return names


@pytest.fixture(scope="module")
def exposed_labels(scrape: str) -> set[str]:
    """Every label name on the broker's samples, plus those Prometheus adds."""
    labels = set(TARGET_LABELS)
    for family in text_string_to_metric_families(scrape):
        for sample in family.samples:
            labels.update(sample.labels)
    return labels


@pytest.mark.parametrize(
    ("alert", "expression"),
    [pytest.param(*item, id=item[0]) for item in sorted(alert_expressions().items())],
)
def test_alert_names_only_exposed_metrics(
    alert: str, expression: str, exposed_metrics: set[str], exposed_labels: set[str]
) -> None:
    """Every metric and label an alert reads is one the broker (or kube-state-metrics) exposes."""
    names = metric_names(expression)
    assert names, f"{alert}: no metric found in {expression!r}"
    unknown = names - exposed_metrics - KUBE_STATE_METRICS
    assert not unknown, f"{alert} reads metrics nobody exposes: {sorted(unknown)}"
    unknown_labels = label_names(expression) - exposed_labels
    assert not unknown_labels, f"{alert} uses labels nobody sets: {sorted(unknown_labels)}"


@pytest.mark.parametrize(
    ("panel", "expression"),
    [pytest.param(*item, id=item[0]) for item in sorted(dashboard_expressions().items())],
)
def test_dashboard_names_only_exposed_metrics(
    panel: str, expression: str, exposed_metrics: set[str], exposed_labels: set[str]
) -> None:
    """Every metric and label a dashboard panel or variable queries is one the broker exposes."""
    names = metric_names(expression)
    assert names, f"{panel}: no metric found in {expression!r}"
    unknown = names - exposed_metrics
    assert not unknown, f"panel {panel!r} queries metrics the broker does not expose: {unknown}"
    unknown_labels = label_names(expression) - exposed_labels
    assert not unknown_labels, f"panel {panel!r} uses labels nobody sets: {sorted(unknown_labels)}"


def test_required_alerts_exist() -> None:
    """Operators get alerted on expiring tokens, rejected credentials, upstream trouble, budget
    exhaustion, a renewal plan near or past the budget's capacity and a broker without ready
    replicas."""
    expressions = alert_expressions()
    read = {alert: metric_names(expression) for alert, expression in expressions.items()}
    needed = {
        "monogoto_broker_token_expiry_timestamp_seconds",
        "monogoto_broker_credentials_rejected",
        "monogoto_broker_upstream_requests_total",
        "monogoto_broker_auth_budget_denied_total",
        "monogoto_broker_auth_budget_utilisation",
        "monogoto_broker_accounts_at_risk",
        "kube_deployment_status_replicas_available",
    }
    assert needed <= set().union(*read.values())
    assert "monogoto_broker_auth_budget_utilisation" in metric_names(
        expressions["MonogotoBrokerAuthBudgetNearCapacity"]
    )
    assert "monogoto_broker_accounts_at_risk" in metric_names(
        expressions["MonogotoBrokerAccountsAtRisk"]
    )
    rate_limited = [a for a, e in expressions.items() if 'result="rate_limited"' in e]
    assert rate_limited, "no alert on Monogoto answering 429"


def test_dashboard_shows_the_renewal_plan() -> None:
    """The dashboard has a panel for the planned utilisation and one for accounts at risk."""
    read = set().union(*(metric_names(e) for e in dashboard_expressions().values()))
    assert {
        "monogoto_broker_auth_budget_utilisation",
        "monogoto_broker_accounts_at_risk",
    } <= read


def test_chart_and_plain_alerts_are_identical() -> None:
    """The Helm chart's PrometheusRule and deploy/prometheus/alerts.yaml carry the same rules."""
    assert CHART_ALERTS.read_bytes() == ALERTS.read_bytes()


def test_metric_name_extraction() -> None:
    """The expression parser finds selected metrics and skips labels, functions and keywords."""
    expression = (
        'sum by (namespace, account) (increase(monogoto_broker_upstream_requests_total{result=~"'
        'error|timeout"}[15m])) > 0 unless max(up) - time() < 15 * 60'
    )
    assert metric_names(expression) == {"monogoto_broker_upstream_requests_total", "up"}
    assert label_names(expression) == {"namespace", "account", "result"}


def test_chart_schema_takes_every_redis_url_scheme() -> None:
    """`secrets.redisUrl` in the chart's values schema accepts every scheme the broker accepts
    (Sentinel and Cluster included) and still rejects others."""
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    pattern = schema["properties"]["secrets"]["properties"]["redisUrl"]["pattern"]
    for scheme in STORE_SCHEMES:
        assert re.search(pattern, f"{scheme}://redis:6379"), f"the chart refuses {scheme}://"
    for url in ("http://redis:6379", "redis+proxy://redis", "redis+sentinel:/redis", "redis:6379"):
        assert not re.search(pattern, url), f"the chart accepts {url}"


def test_network_policy_allows_sentinel_by_default() -> None:
    """The chart's NetworkPolicy lets the pods reach Redis (6379) and Sentinel (26379) unless
    the values say otherwise."""
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    assert {6379, 26379} <= set(values["networkPolicy"]["redis"]["ports"])
