"""Read the PromQL expressions out of the Grafana dashboard and the Prometheus console template,
and name the metrics each expression reads, so tests can run and check every one of them."""

from __future__ import annotations

import json
import re
from pathlib import Path

__all__ = [
    "REPO_ROOT",
    "DASHBOARD_PATH",
    "CONSOLE_PATH",
    "GRAFANA_RATE_INTERVAL",
    "dashboard_panels",
    "dashboard_queries",
    "expand_grafana_variables",
    "console_queries",
    "metric_names_in",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
DASHBOARD_PATH = REPO_ROOT / "deploy" / "grafana" / "dashboards" / "gradserve.json"
CONSOLE_PATH = REPO_ROOT / "deploy" / "prometheus" / "consoles" / "gradserve.html"

# What Grafana substitutes for $__rate_interval with the provisioned 15 s scrape interval
# (4 x scrape interval); the console template uses the same window literally.
GRAFANA_RATE_INTERVAL = "1m"

_PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "and", "or", "unless", "offset", "inf", "nan",
}


def dashboard_panels(path: Path = DASHBOARD_PATH) -> list[dict]:
    """Every panel, rows' nested panels included."""
    dashboard = json.loads(path.read_text())
    panels: list[dict] = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def dashboard_queries(path: Path = DASHBOARD_PATH) -> list[tuple[str, str]]:
    """(panel title, PromQL expression as written) for every target of every panel."""
    return [
        (panel["title"], target["expr"])
        for panel in dashboard_panels(path)
        for target in panel.get("targets", [])
    ]


def expand_grafana_variables(expr: str, rate_interval: str = GRAFANA_RATE_INTERVAL) -> str:
    """Replace the Grafana macros the dashboard uses with what Grafana would send Prometheus."""
    expanded = expr.replace("$__rate_interval", rate_interval).replace("$__interval", rate_interval)
    leftover = re.findall(r"\$\w+", expanded)
    if leftover:
        raise ValueError(f"unexpanded Grafana variables {leftover} in {expr!r}")
    return expanded


def console_queries(path: Path = CONSOLE_PATH) -> list[str]:
    """Expressions of the console template: `expr:` of each PromConsole.Graph (a string or a list
    of strings, single-quoted) and the backquoted expression of each `gradserve_stat` row."""
    text = path.read_text()
    queries: list[str] = []
    # One `expr:` per line; the list's brackets are matched greedily since PromQL has [1m] inside.
    for match in re.finditer(r"^\s*expr:\s*(\[.*\]|'[^']*'),?\s*$", text, flags=re.M):
        queries.extend(re.findall(r"'([^']*)'", match.group(1)))
    for match in re.finditer(r'gradserve_stat"\s*\(args\s+"[^"]*"\s+`([^`]*)`', text):
        queries.append(match.group(1))
    return queries


def metric_names_in(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers left once strings, label matchers, range
    windows and grouping clauses are removed, minus function names (followed by `(`) and
    keywords. Deliberately strict: anything unexpected shows up as a 'metric' and fails a test."""
    text = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', "", expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", text):
        identifier, is_call = match.group(1), match.group(2)
        if is_call or identifier.lower() in _PROMQL_KEYWORDS:
            continue
        names.add(identifier)
    return names
