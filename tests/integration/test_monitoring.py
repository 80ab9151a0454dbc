"""The alert rules and the dashboard of k8s/monitoring, tested like code with Prometheus' own
`promtool`: the rules pass `promtool check rules`, and every alert has unit tests
(k8s/monitoring/alerts_test.yaml, `promtool test rules`) that make it fire on a synthetic series
of its failure and stay quiet on a healthy one. Each alert's tests are shown to bite: with its
rule replaced by one that never fires, its firing cases fail; with one that always fires, its
quiet cases fail. The dashboard's queries are checked as PromQL by the same tool.

promtool comes from the Debian package `prometheus` (.ci/run installs it); on CI (CI=true) a
missing promtool fails these tests instead of skipping them.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "k8s" / "monitoring"
RULES = MONITORING / "alerts.yaml"
RULE_TESTS = MONITORING / "alerts_test.yaml"
DASHBOARD = MONITORING / "dashboard.json"
RULES_FILE = "alerts.rules.yaml"  # what alerts_test.yaml loads (rule_files)


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["spec"]["groups"] for r in g["rules"] if "alert" in r]


ALERTS = [r["alert"] for r in alert_rules()]


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing on CI: .ci/run installs it (Debian package "
                        "prometheus)")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return found


def run(promtool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60)


def plain_rules(groups: list[dict[str, Any]] | None = None) -> str:
    """The PrometheusRule's groups as a plain Prometheus rules file (what promtool reads)."""
    if groups is None:
        groups = yaml.safe_load(RULES.read_text())["spec"]["groups"]
    return yaml.safe_dump({"groups": groups}, sort_keys=False)


def write_case(directory: Path, groups: list[dict[str, Any]] | None = None,
               tests: dict[str, Any] | None = None) -> Path:
    """A directory holding the rules file and a rule test file, as promtool wants them."""
    (directory / RULES_FILE).write_text(plain_rules(groups))
    if tests is None:
        shutil.copy(RULE_TESTS, directory / RULE_TESTS.name)
    else:
        (directory / RULE_TESTS.name).write_text(yaml.safe_dump(tests, sort_keys=False))
    return directory / RULE_TESTS.name


def rule_tests() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(RULE_TESTS.read_text())
    return doc


def only(alert: str, firing: bool) -> dict[str, Any]:
    """alerts_test.yaml restricted to the checks of ``alert`` that expect it firing (or quiet)."""
    doc = rule_tests()
    kept = []
    for case in doc["tests"]:
        checks = [c for c in case.get("alert_rule_test", [])
                  if c["alertname"] == alert and bool(c.get("exp_alerts")) == firing]
        if checks:
            kept.append({**case, "alert_rule_test": checks})
    doc["tests"] = kept
    return doc


def with_expr(alert: str, expr: str) -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = copy.deepcopy(
        yaml.safe_load(RULES.read_text())["spec"]["groups"])
    for group in groups:
        for rule in group["rules"]:
            if rule.get("alert") == alert:
                rule["expr"] = expr
    return groups


# -- the rules -------------------------------------------------------------------------------------

def test_promtool_checks_the_rules(promtool: str, tmp_path: Path) -> None:
    (tmp_path / RULES_FILE).write_text(plain_rules())
    proc = run(promtool, "check", "rules", RULES_FILE, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in proc.stdout


def test_promtool_check_rejects_a_broken_rule(promtool: str, tmp_path: Path) -> None:
    (tmp_path / RULES_FILE).write_text(plain_rules(with_expr(ALERTS[0], "outbox_pending >")))
    proc = run(promtool, "check", "rules", RULES_FILE, cwd=tmp_path)
    assert proc.returncode != 0 and "parse error" in proc.stdout + proc.stderr


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    checks = [c for case in rule_tests()["tests"] for c in case.get("alert_rule_test", [])]
    tested = {c["alertname"] for c in checks}
    assert tested <= set(ALERTS), f"tests for unknown alerts: {tested - set(ALERTS)}"
    for alert in ALERTS:
        mine = [c for c in checks if c["alertname"] == alert]
        assert any(c.get("exp_alerts") for c in mine), f"{alert}: no case where it fires"
        assert any(not c.get("exp_alerts") for c in mine), f"{alert}: no quiet case"


def test_promtool_unit_tests_pass(promtool: str, tmp_path: Path) -> None:
    test_file = write_case(tmp_path)
    proc = run(promtool, "test", "rules", test_file.name, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


@pytest.mark.parametrize("alert", ALERTS)
def test_firing_cases_catch_a_rule_that_never_fires(
        promtool: str, tmp_path: Path, alert: str) -> None:
    test_file = write_case(tmp_path, with_expr(alert, "vector(1) > 2"), only(alert, True))
    proc = run(promtool, "test", "rules", test_file.name, cwd=tmp_path)
    assert proc.returncode != 0, proc.stdout
    assert f"alertname: {alert}" in proc.stdout + proc.stderr
    assert "got:[]" in proc.stdout + proc.stderr


@pytest.mark.parametrize("alert", ALERTS)
def test_quiet_cases_catch_a_rule_that_always_fires(
        promtool: str, tmp_path: Path, alert: str) -> None:
    # every series of the test, kept apart by its name (an alert drops __name__)
    always = 'label_replace({__name__=~"outbox_.+"}, "metric", "$1", "__name__", "(.+)")'
    test_file = write_case(tmp_path, with_expr(alert, always), only(alert, False))
    proc = run(promtool, "test", "rules", test_file.name, cwd=tmp_path)
    assert proc.returncode != 0, proc.stdout
    assert f"alertname: {alert}" in proc.stdout + proc.stderr
    assert "got:[]" not in proc.stdout + proc.stderr


# -- the dashboard ---------------------------------------------------------------------------------

def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())  # valid JSON, or this fails
    return doc


def test_dashboard_panels_are_well_formed() -> None:
    panels = dashboard()["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, f"{p['title']} is wider than the grid"
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]
        assert p.get("targets"), f"{p['title']} queries nothing"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), f"{p['title']}: duplicate refId"
    titles = {p["title"] for p in panels}
    assert "Ordering horizon" in titles


def test_dashboard_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    """Each panel's query as a recording rule, with Grafana's variables filled in."""
    fill = {"$__rate_interval": "1m", "$namespace": "shop", "$pod": "relay-a"}
    rules = []
    for p in dashboard()["panels"]:
        for t in p["targets"]:
            expr = t["expr"]
            for var, value in fill.items():
                expr = expr.replace(var, value)
            assert not re.search(r"\$\w", expr), f"unknown variable in {t['expr']}"
            rules.append({"record": f"dashboard:panel_{p['id']}:{t['refId'].lower()}",
                          "expr": expr})
    (tmp_path / "dashboard.rules.yaml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, sort_keys=False))
    proc = run(promtool, "check", "rules", "dashboard.rules.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
