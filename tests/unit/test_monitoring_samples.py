"""The alert rules and the dashboard in deploy/monitoring name only metrics the daemons expose, and
the dashboard is valid JSON with a query per panel."""

from __future__ import annotations

import json
import re
from pathlib import Path

from hvr_common.pure.metric_names import (PRIMARY_HEALTH, PRIMARY_METRICS, PRIMARY_STATE, READY, REPLICA_HEALTH,
                                          REPLICA_METRICS, REPLICA_STATE, UNAVAILABLE_VMS)

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"
EXPOSED = {s.full_name for s in (*PRIMARY_METRICS, *REPLICA_METRICS, PRIMARY_HEALTH, PRIMARY_STATE, REPLICA_HEALTH,
                                 REPLICA_STATE, READY, UNAVAILABLE_VMS)}


def names_in(text: str) -> set[str]:
    return set(re.findall(r"\bhvr_[a-z_]+\b", text))


def test_alert_rules_use_exposed_metrics_and_cover_the_four_alerts():
    text = (DEPLOY / "hvr-alerts.yml").read_text()
    used = names_in(text)
    assert used and used <= EXPOSED, used - EXPOSED
    for alert in ("HvrRpoOverTarget", "HvrHealthCritical", "HvrNoCycleForAnHour", "HvrVmUnavailable"):
        assert f"alert: {alert}" in text


def test_dashboard_is_json_and_uses_exposed_metrics():
    dash = json.loads((DEPLOY / "hvr-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert exprs and all(exprs)
    used = names_in(" ".join(exprs))
    assert used <= EXPOSED, used - EXPOSED
    assert "hvr_replication_rpo_seconds" in used
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
