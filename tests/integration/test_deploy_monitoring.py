"""The monitoring artefacts of k8s/monitoring: the alert rules and the dashboard query only
metrics the relay really exports, and the kustomization renders."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from prometheus_client import generate_latest

from outbox.metrics import REGISTRY
from tests.kustomize import K8S, render

pytestmark = pytest.mark.timeout(120)


def exported_series() -> set[str]:
    """Every sample name the relay's /metrics can show (``_total``, ``_bucket``...)."""
    text = generate_latest(REGISTRY).decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines()
            if line and not line.startswith("#")}


def referenced_metrics(text: str) -> set[str]:
    return set(re.findall(r"\boutbox_[a-z_]+[a-z]\b", text))


def test_alert_rules_cover_the_failure_modes_with_real_metrics() -> None:
    rules_doc = yaml.safe_load((K8S / "monitoring" / "alerts.yaml").read_text())
    rules = [r for g in rules_doc["spec"]["groups"] for r in g["rules"]]
    series = exported_series()
    used: set[str] = set()
    for rule in rules:
        assert {"alert", "expr", "labels", "annotations"} <= set(rule), rule
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]
        names = referenced_metrics(rule["expr"])
        assert names and names <= series, f"{rule['alert']}: unknown {names - series}"
        used |= names
    assert {"outbox_oldest_pending_age_seconds", "outbox_dead_rows", "outbox_blocked_keys",
            "outbox_ready", "outbox_connected", "outbox_publish_failures_total"} <= used


def test_dashboard_queries_real_metrics() -> None:
    dashboard = json.loads((K8S / "monitoring" / "dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    series = exported_series()
    for expr in exprs:
        names = referenced_metrics(expr)
        assert names and names <= series, f"unknown {names - series} in {expr}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_monitoring_kustomization_renders() -> None:
    kinds = {o["kind"] for o in render(K8S / "monitoring")}
    assert kinds == {"ServiceMonitor", "PrometheusRule"}
