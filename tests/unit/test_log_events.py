"""Every event either daemon logs has its row in the Logs section of docs/operations.md: the event names are
a stable interface (alerts and jq filters select on them), so a new one is documented with it."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("hvr_agent", "hvr_listener", "hvr_common", "hvrctl")


def _logged_events() -> dict[str, str]:
    """{event name: where} for every ``event(logger, "name", ...)`` call with a literal name."""
    found: dict[str, str] = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not isinstance(node, ast.Call) or len(node.args) < 2:
                    continue
                func = node.func
                called = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) \
                    else None
                name = node.args[1]
                if called == "event" and isinstance(name, ast.Constant) and isinstance(name.value, str):
                    found.setdefault(name.value, f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def _logs_section() -> str:
    text = (REPO / "docs" / "operations.md").read_text()
    start = text.index("\n## Logs\n")
    return text[start:text.index("\n## ", start + 1)]


def test_the_walk_finds_the_events():
    events = _logged_events()
    assert {"vm_cut", "cycle_shipped", "cycle_applied", "backup_began", "resync_started"} <= set(events)
    assert len(events) > 100


def test_every_logged_event_is_documented_in_the_logs_section():
    section = _logs_section()
    missing = {name: where for name, where in _logged_events().items() if f"`{name}`" not in section}
    assert not missing, f"events without a row in docs/operations.md#logs: {missing}"
