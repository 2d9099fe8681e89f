"""deploy/grafana: the provisioning files agree with each other and with docker-compose.yml, every
dashboard panel the issue asks for is there, and every PromQL expression of the dashboard parses
in a real Prometheus, reads only metrics services/gradserve_services/metrics/definitions.py defines, and returns data after
Prometheus has scraped a recorded training run."""

from __future__ import annotations

import json
import time

import pytest
import yaml

from gradserve_services import metrics
from tests.support import prometheus
from tests.support.dashboard import (
    DASHBOARD_PATH,
    REPO_ROOT,
    dashboard_panels,
    dashboard_queries,
    expand_grafana_variables,
    metric_names_in,
)

GRAFANA_DIR = REPO_ROOT / "deploy" / "grafana"
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

# Panel title fragments the dashboard must have (issue 6), matched case-insensitively.
REQUIRED_PANELS = (
    "loss", "samples / s", "step latency p50 / p99", "phase breakdown", "gradient global norm",
    "staleness", "workers alive", "rpc errors by code", "bytes / s",
)


def histogram_names() -> set[str]:
    return {family.name for family in metrics.REGISTRY.collect() if family.type == "histogram"}


def declared_metric(name: str) -> bool:
    if name in metrics.METRIC_NAMES:
        return True
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)] in histogram_names():
            return True
    return False


def test_required_panels_present_with_unique_ids():
    panels = dashboard_panels()
    titles = [panel["title"].lower() for panel in panels]
    for fragment in REQUIRED_PANELS:
        assert any(fragment in title for title in titles), f"no panel for {fragment!r}: {titles}"
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    assert all(panel.get("targets") for panel in panels)


def test_panels_use_the_provisioned_datasource():
    datasources = yaml.safe_load((GRAFANA_DIR / "provisioning/datasources/prometheus.yml").read_text())
    (datasource,) = datasources["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    for panel in dashboard_panels():
        assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == datasource["uid"], panel["title"]


def test_dashboard_provider_points_at_the_mounted_dashboards():
    provider = yaml.safe_load((GRAFANA_DIR / "provisioning/dashboards/provider.yml").read_text())
    (entry,) = provider["providers"]
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    grafana_mounts = compose["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{entry['options']['path']}:ro" in grafana_mounts
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana_mounts
    assert json.loads(DASHBOARD_PATH.read_text())["uid"]


@pytest.mark.parametrize("title,expr", dashboard_queries(), ids=[e for _, e in dashboard_queries()])
def test_expression_reads_only_declared_metrics(title, expr):
    names = metric_names_in(expr)
    assert names, f"{title}: no metric found in {expr!r}"
    undeclared = {name for name in names if not declared_metric(name)}
    assert not undeclared, f"{title}: {expr!r} reads metrics services/gradserve_services/metrics/definitions.py does not define: {undeclared}"


def test_metric_name_extraction_catches_unknown_names():
    # Guards the check above: a typo or foreign metric must surface as an undeclared name.
    assert metric_names_in('sum by (code) (rate(gradserve_rpc_request_total{code!="OK"}[5m]))') == {
        "gradserve_rpc_request_total"
    }
    assert not declared_metric("gradserve_rpc_request_total")
    assert not declared_metric("gradserve_loss_bucket")
    assert declared_metric("gradserve_step_duration_seconds_bucket")


@pytest.mark.slow
def test_prometheus_reports_parse_errors(live_prometheus):
    with pytest.raises(prometheus.PromQLError) as raised:
        prometheus.query(live_prometheus.url, "sum(rate(gradserve_loss[1m])")
    assert raised.value.error_type == "bad_data"


@pytest.mark.slow
def test_every_dashboard_query_returns_data_from_real_prometheus(live_prometheus):
    expressions = [expand_grafana_variables(expr) for _title, expr in dashboard_queries()]
    # Every expression must parse (a PromQLError fails the test at once); data may take a few
    # scrapes to show up in every window, so retry the empty ones for a bounded time.
    deadline = time.monotonic() + 30
    while True:
        empty = [expr for expr in expressions
                 if not prometheus.has_finite_value(prometheus.query(live_prometheus.url, expr))]
        if not empty or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not empty, f"dashboard queries without data after a recorded run: {empty}"
