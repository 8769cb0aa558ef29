"""The monitoring component: rules promtool accepts and whose unit tests pass, and a dashboard and rules that use
only metrics segrelay exports (read from a running server's /metrics)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support import ROOT, Segrelay, fixture, wait_until

MONITORING = ROOT / "k8s" / "components" / "monitoring"


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is not installed (scripts/test installs Debian's prometheus package)")
        pytest.skip("promtool is not installed: apt-get install prometheus")
    return found


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule["spec"]))
    shutil.copy(MONITORING / "rules-test.yaml", tmp_path / "rules-test.yaml")
    return tmp_path


def test_promtool_accepts_the_rules(rules_dir: Path) -> None:
    result = subprocess.run([promtool(), "check", "rules", str(rules_dir / "rules.yaml")], capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 9 rules found" in result.stdout


def test_the_rules_fire_as_their_unit_tests_say(rules_dir: Path) -> None:
    result = subprocess.run([promtool(), "test", "rules", "rules-test.yaml"], cwd=rules_dir, capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def exported(server: Segrelay) -> set[str]:
    """Metric family names on a real server's /metrics, once it has accepted, skipped, stitched and delivered
    something."""
    server.post({**fixture("order_completed.json"), "messageId": "monitoring-1"},
                {"segmentstreamApiToken": "ss-token"})
    server.post({**fixture("identify.json"), "messageId": "monitoring-2"}, {"segmentstreamApiToken": "ss-token"})
    # The same user's order from a backend: stitched from the browser order above.
    server.post({**fixture("order_completed_server.json"), "messageId": "monitoring-3"},
                {"segmentstreamApiToken": "ss-token"})
    text = ""

    def delivered() -> bool:
        nonlocal text
        text = httpx.get(server.url + "/metrics").text
        return "segrelay_vendor_request_duration_seconds_bucket" in text and "segrelay_circuit_open{" in text
    assert wait_until(delivered, 15), text
    return set(re.findall(r"^# TYPE (segrelay_\w+) ", text, re.M))


def used(expressions: list[str]) -> set[str]:
    names = set()
    for expr in expressions:
        for name in re.findall(r"\bsegrelay_\w+", expr):
            names.add(re.sub(r"_(total|bucket|sum|count)$", "", name))
    return names


def test_dashboard_and_rules_use_only_exported_metrics(server: Segrelay) -> None:
    families = {re.sub(r"_total$", "", name) for name in exported(server)}
    dashboard = json.loads((MONITORING / "dashboard.json").read_text())
    panel_exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    rule_exprs = [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]
    assert used(panel_exprs) and used(rule_exprs)
    assert used(panel_exprs) <= families, used(panel_exprs) - families
    assert used(rule_exprs) <= families, used(rule_exprs) - families
    assert {p["id"] for p in dashboard["panels"]} == set(range(1, len(dashboard["panels"]) + 1))
