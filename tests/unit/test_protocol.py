"""The wire schema (hvr_common.pure.wire): messages, routes and the error catalogue."""

from __future__ import annotations

import ast
import importlib
import json
import pkgutil
import uuid
from pathlib import Path

import pytest

import hvr_agent
import hvr_common
import hvr_listener
import hvrctl
from hvr_agent.replica_client import (
    ReplicaAuthError, ReplicaConflictError, ReplicaError, ReplicaRejectedError, ReplicaUnavailableError, _answer,
)
from hvr_common.pure.errors import HvrError, UsageError
from hvr_common.pure.replication_state import ReplicationState
from hvr_common.pure.wire import routes
from hvr_common.pure.wire.error_catalogue import (
    CATALOGUE, RemoteError, error, error_class, error_from_body, status_for,
)
from hvr_common.pure.wire.messages import DiskSpec, EnableRequest, InitialCompleteRequest, ReplicaView
from hvr_common.pure.wire.status_views import PrimaryStatus, ReplicaStatus

REPO = Path(__file__).resolve().parents[2]
PRODUCT = ("hvr_common", "hvr_agent", "hvr_listener", "hvrctl")
VM = uuid.UUID("6f1c3a52-8d7e-4b0a-9c1d-2e3f4a5b6c7d")
D0 = uuid.UUID("00000000-0000-4000-8000-000000000001")
D1 = uuid.UUID("00000000-0000-4000-8000-000000000002")


def enable_body() -> dict:
    return {"name": "web1", "generation": 3, "frequency_s": 300, "compression": False,
            "disks": [{"disk_id": str(D0), "name": "d0", "size_bytes": 1 << 30},
                      {"disk_id": str(D1), "name": "d1", "size_bytes": 4096}]}


def view_body() -> dict:
    return {"vm_id": str(VM), "name": "web1", "state": "Replicating", "generation": 2, "next_sequence": 7,
            "last_received_sequence": 6, "last_applied_sequence": 5, "initial": {str(D0): 1 << 30, str(D1): 4096},
            "last_replication_time_ns": 1_700_000_000_000_000_000, "last_applied_log_time_ns": None}


# --- messages: round trips --------------------------------------------------------------
def test_enable_request_round_trips():
    req = EnableRequest.from_json(enable_body())
    assert req == EnableRequest("web1", 3, 300, False, (DiskSpec(D0, "d0", 1 << 30), DiskSpec(D1, "d1", 4096)))
    assert req.to_json() == enable_body()
    assert EnableRequest.from_json(req.to_json()) == req


def test_enable_compression_defaults_to_true():
    body = enable_body()
    del body["compression"]
    assert EnableRequest.from_json(body).compression is True


def test_initial_complete_round_trips():
    req = InitialCompleteRequest(4, 12)
    assert req.to_json() == {"generation": 4, "next_sequence": 12}
    assert InitialCompleteRequest.from_json(req.to_json()) == req


def test_replica_view_round_trips_and_keeps_the_wire_keys_in_order():
    view = ReplicaView.from_json(view_body())
    assert view.state is ReplicationState.REPLICATING and view.initial == ((D0, 1 << 30), (D1, 4096))
    assert view.to_json() == view_body()
    assert list(view.to_json()) == list(ReplicaView.FIELDS)


def test_replica_view_from_a_replica_record():
    class Disk:
        def __init__(self, disk_id, offset):
            self.disk_id, self.initial_offset = disk_id, offset

    class Rep:
        vm_id, name, state, generation = VM, "web1", ReplicationState.WAITING_FOR_INITIAL_REPLICATION, 1
        next_sequence = last_received_sequence = last_applied_sequence = 0
        disks = [Disk(D0, 0), Disk(D1, 512)]
        last_replication_ns = last_applied_log_ns = None

    view = ReplicaView.from_replica(Rep())
    assert view.to_json()["initial"] == {str(D0): 0, str(D1): 512}
    assert ReplicaView.from_json(view.to_json()) == view
    with pytest.raises(AttributeError):
        view.generation = 2  # a frozen snapshot


# --- messages: every bad field refused with its name ------------------------------------
def _set(path: tuple, value):
    def mutate(body):
        target = body
        for key in path[:-1]:
            target = target[key]
        if value is KeyError:
            del target[path[-1]]
        else:
            target[path[-1]] = value
    return mutate


BAD_ENABLE = [
    (_set(("name",), "bad name"), "name"),
    (_set(("name",), None), "name"),
    (_set(("name",), "x" * 65), "name"),
    (_set(("generation",), 0), "generation"),
    (_set(("generation",), True), "generation"),
    (_set(("generation",), "3"), "generation"),
    (_set(("frequency_s",), 60), "frequency_s"),
    (_set(("frequency_s",), KeyError), "frequency_s"),
    (_set(("compression",), "yes"), "compression"),
    (_set(("disks",), []), "disks"),
    (_set(("disks",), {"d0": 1}), "disks"),
    (_set(("disks",), [enable_body()["disks"][0]] * 65), "disks"),
    (_set(("disks", 0), "d0"), "disks[0]"),
    (_set(("disks", 1, "disk_id"), "not-a-uuid"), "disks[1].disk_id"),
    (_set(("disks", 1, "disk_id"), 7), "disks[1].disk_id"),
    (_set(("disks", 0, "name"), "../etc"), "disks[0].name"),
    (_set(("disks", 0, "size_bytes"), 0), "disks[0].size_bytes"),
    (_set(("disks", 0, "size_bytes"), 64 * 1024 ** 4 + 1), "disks[0].size_bytes"),
    (_set(("disks", 0, "size_bytes"), 1.5), "disks[0].size_bytes"),
    (_set(("disks", 0, "size_bytes"), KeyError), "size_bytes"),
    (_set(("disks", 0, "extra"), 1), "extra"),
    (_set(("disks", 1, "name"), "d0"), "disks"),
    (_set(("disks", 1, "disk_id"), str(D0)), "disks"),
    (_set(("surprise",), 1), "surprise"),
]


@pytest.mark.parametrize("mutate, field", BAD_ENABLE, ids=[f"{i}-{f}" for i, (_, f) in enumerate(BAD_ENABLE)])
def test_a_bad_enable_field_is_refused_with_its_name(mutate, field):
    body = enable_body()
    mutate(body)
    with pytest.raises(UsageError) as info:
        EnableRequest.from_json(body)
    assert field in info.value.message and info.value.code == "bad_request"


@pytest.mark.parametrize("body, field", [
    ({"next_sequence": 2}, "generation"), ({"generation": 1}, "next_sequence"),
    ({"generation": 1, "next_sequence": 0}, "next_sequence"), ({"generation": -1, "next_sequence": 1}, "generation"),
    ({"generation": 1, "next_sequence": False}, "next_sequence"),
])
def test_a_bad_initial_complete_field_is_refused_with_its_name(body, field):
    with pytest.raises(UsageError, match=field):
        InitialCompleteRequest.from_json(body)


@pytest.mark.parametrize("key, value", [
    ("vm_id", "nope"), ("name", ""), ("state", "Sleeping"), ("generation", 0), ("next_sequence", -1),
    ("last_received_sequence", None), ("last_applied_sequence", "5"), ("initial", []),
    ("last_replication_time_ns", -5), ("last_applied_log_time_ns", "now"), ("extra", 1),
])
def test_a_bad_replica_view_field_is_refused_with_its_name(key, value):
    body = view_body()
    body[key] = value
    with pytest.raises(UsageError, match=key):
        ReplicaView.from_json(body)


def test_a_bad_initial_offset_names_its_disk():
    body = view_body()
    body["initial"] = {str(D0): -1}
    with pytest.raises(UsageError, match=f"initial.{D0}"):
        ReplicaView.from_json(body)


@pytest.mark.parametrize("parse", [EnableRequest.from_json, InitialCompleteRequest.from_json, ReplicaView.from_json])
def test_a_body_that_is_not_an_object_is_refused(parse):
    with pytest.raises(UsageError, match="object"):
        parse([1, 2])


# --- routes -----------------------------------------------------------------------------
def test_route_builders_fill_their_templates():
    assert routes.server_path() == "/v1/server"
    assert routes.replica_path(VM) == f"/v1/replicas/{VM}"
    assert routes.initial_window_path(VM, D0, 0, 4096) == f"/v1/replicas/{VM}/initial/{D0}?offset=0&end=4096"
    assert routes.initial_complete_path(VM) == f"/v1/replicas/{VM}/initial/complete"
    assert routes.cycle_path(VM, 12) == f"/v1/replicas/{VM}/cycles/12"
    assert routes.cycle_path(VM, 12, "crash") == f"/v1/replicas/{VM}/cycles/12"
    assert routes.cycle_path(VM, 12, "application") == f"/v1/replicas/{VM}/cycles/12?consistency=application"
    assert routes.replica_settings_path(VM) == f"/v1/replicas/{VM}/settings"
    for template in (routes.REPLICA, routes.INITIAL_WINDOW, routes.INITIAL_COMPLETE, routes.CYCLE,
                     routes.REPLICA_SETTINGS):
        assert template.startswith(routes.PREFIX + "/")


# --- the error catalogue ----------------------------------------------------------------
@pytest.mark.parametrize("code", sorted(CATALOGUE))
def test_every_code_has_a_status_and_builds_its_error(code):
    entry = CATALOGUE[code]
    assert 400 <= entry.status <= 599 and entry.exit_code > 0 and entry.meaning
    exc = error(code, "something", hint="do this", detail={"offset": 5})
    assert isinstance(exc, entry.base) and isinstance(exc, error_class(code))
    assert (exc.code, exc.transient, exc.exit_code) == (code, entry.transient, entry.exit_code)
    assert status_for(exc) == entry.status


@pytest.mark.parametrize("code", sorted(CATALOGUE))
def test_status_for_and_error_from_body_round_trip(code):
    sent = error(code, "something", hint="do this", detail={"offset": 5})
    back = error_from_body(status_for(sent), sent.to_dict())
    assert type(back) is type(sent) and back.to_dict() == sent.to_dict()
    assert (back.code, back.transient, back.exit_code) == (sent.code, sent.transient, sent.exit_code)


def test_an_unknown_code_is_refused_by_the_factory():
    with pytest.raises(ValueError):
        error("no_such_code", "x")


@pytest.mark.parametrize("status, code, exit_code, transient", [
    (502, "unknown_vm", 1, False),           # a replica's refusal passed on by the agent
    (502, "unauthenticated", 77, False),
    (502, "not_authorized", 77, False),
    (503, "internal", 75, True),             # a replica's failure passed on: transient
    (405, "http_error", 1, False),
    (400, "from_a_newer_version", 2, False),
    (500, None, 1, False),
])
def test_an_answer_whose_status_is_not_its_codes_keeps_code_and_status(status, code, exit_code, transient):
    exc = error_from_body(status, {"code": code, "message": "m"} if code else {})
    assert isinstance(exc, RemoteError)
    assert (exc.status, exc.exit_code, exc.transient) == (status, exit_code, transient)
    assert exc.code == (code or ("transient" if transient else "internal"))
    assert status_for(exc) == (503 if transient else 502)


def test_a_malformed_error_body_still_gives_an_error():
    exc = error_from_body(400, {"code": 5, "message": None, "hint": [], "detail": "x"})
    assert isinstance(exc, HvrError) and exc.message == "HTTP 400" and exc.hint is None and exc.detail == {}


# --- the agent's client maps answers with the catalogue ---------------------------------
@pytest.mark.parametrize("status, code, cls, transient", [
    (400, "digest_mismatch", ReplicaUnavailableError, True),
    (400, "body_truncated", ReplicaUnavailableError, True),
    (400, "bundle_corrupt", ReplicaRejectedError, False),
    (401, "unauthenticated", ReplicaAuthError, False),
    (409, "initial_gap", ReplicaConflictError, False),
    (413, "body_too_large", ReplicaRejectedError, False),
    (429, None, ReplicaUnavailableError, True),
    (500, "internal", ReplicaUnavailableError, True),
    (503, "signed_before_restart", ReplicaUnavailableError, True),
])
def test_the_agent_maps_a_replica_answer(status, code, cls, transient):
    raw = error_from_body(status, {"code": code, "message": "m", "detail": {"offset": 8}}).to_dict() if code else {}
    with pytest.raises(cls) as info:
        _answer(status, json.dumps(raw).encode(), "PUT /v1/x")
    exc = info.value
    assert exc.transient is transient and exc.status == status
    assert exc.code == (code or "replica_unavailable")
    assert status_for(exc) == (503 if transient else 502)
    if not transient:
        assert isinstance(exc, ReplicaError) and exc.detail == {"offset": 8, "status": status}


# --- every code hvr emits is catalogued; none is set after an error was made -------------
def _product_sources():
    for package in PRODUCT:
        yield from sorted((REPO / package).rglob("*.py"))


def _emitted_codes() -> dict[str, str]:
    """Codes in the source: class-level ``code``/``fallback_code`` and literals given to the factories."""
    found: dict[str, str] = {}
    for path in _product_sources():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                for stmt in node.body:
                    if (isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Constant)
                            and any(isinstance(t, ast.Name) and t.id in ("code", "fallback_code")
                                    for t in stmt.targets)):
                        found[stmt.value.value] = f"{path.relative_to(REPO)}:{stmt.lineno}"
            elif (isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("error", "conflict", "error_class")
                  and node.args and isinstance(node.args[0], ast.Constant)):
                found[node.args[0].value] = f"{path.relative_to(REPO)}:{node.lineno}"
    return found


def test_the_source_scan_finds_codes():
    codes = _emitted_codes()
    assert {"hrl_corrupt", "replica_conflict", "unknown_vm", "digest_mismatch", "replica_unavailable"} <= set(codes)


def test_every_code_in_the_source_is_in_the_catalogue():
    missing = {code: where for code, where in _emitted_codes().items() if code not in CATALOGUE}
    assert not missing, f"codes emitted but not catalogued: {missing}"


def _all_error_classes() -> set[type]:
    for package in (hvr_common, hvr_agent, hvr_listener, hvrctl):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if not info.name.endswith(".__main__"):
                importlib.import_module(info.name)
    seen, todo = set(), [HvrError]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            if sub not in seen:
                seen.add(sub)
                todo.append(sub)
    return seen


def test_every_error_class_agrees_with_the_catalogue():
    wrong = []
    for cls in _all_error_classes() | {HvrError}:
        if issubclass(cls, RemoteError) or cls.__module__.startswith("tests"):
            continue  # a remote error's code is the answer's
        entry = CATALOGUE.get(cls.code)
        if entry is None or (cls.transient, cls.exit_code) != (entry.transient, entry.exit_code) \
                or not issubclass(cls, entry.base):
            wrong.append(f"{cls.__module__}.{cls.__qualname__} code={cls.code!r}")
    assert not wrong, wrong


def _code_assignments(source: str) -> list[int]:
    lines = []
    for node in ast.walk(ast.parse(source)):
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr" and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant) and node.args[1].value == "code"):
            lines.append(node.lineno)
        for target in targets:
            for t in ast.walk(target):
                if isinstance(t, ast.Attribute) and t.attr == "code":
                    lines.append(node.lineno)
    return lines


def test_the_assignment_check_can_fail():
    planted = "exc = E('x')\nexc.code = 'y'\nself.code: str = 'z'\nsetattr(exc, 'code', 'w')\na.b.code += 's'\n"
    assert sorted(_code_assignments(planted)) == [2, 3, 4, 5]
    assert _code_assignments("class E:\n    code = 'x'\n") == []


def test_no_module_sets_the_code_of_an_error_instance():
    found = {str(p.relative_to(REPO)): lines for p in _product_sources()
             if (lines := _code_assignments(p.read_text(encoding="utf-8")))}
    assert not found, f"error codes set after creation (build them with error(code, ...)): {found}"


# --- the admin APIs' status snapshots ---------------------------------------------------
def test_primary_status_json_keeps_the_admin_api_keys():
    status = PrimaryStatus(
        vm="web1", vm_id=VM, state=ReplicationState.REPLICATING, state_detail=None, health="Normal",
        health_details=(), frequency_s=30, compression=True, primary_server="p1", principal="p1",
        replica_server="r1", replica_port=8443, generation=1, next_sequence=5, pending_cycles=0,
        last_replication_time=None, last_error=None, enabled_at=None, initial={"percent": 100.0})
    out = status.to_json()
    assert list(out) == ["vm", "vm_id", "state", "state_detail", "health", "health_details", "mode", "frequency_s",
                         "compression", "primary_server", "principal", "replica_server", "replica_port",
                         "generation", "next_sequence", "pending_cycles", "last_replication_time", "last_error",
                         "enabled_at", "initial", "recovery_history", "fine_window_min", "app_consistent_hours",
                         "settings_pending", "last_app_consistent_time", "tracking", "resync", "verify",
                         "prepared_sequence", "tracking_switch"]
    assert out["vm_id"] == str(VM) and out["state"] == "Replicating" and out["mode"] == "Primary"
    assert (out["recovery_history"], out["fine_window_min"], out["app_consistent_hours"]) == (0, 60, None)
    assert json.loads(json.dumps(out)) == out


def test_replica_status_from_a_replica_record():
    class Disk:
        disk_id, name, size_bytes, path, initial_offset = D0, "d0", 4096, Path("/r/web1/d0.img"), 4096

    class Rep:
        name, vm_id, state, state_detail, principal, generation = "web1", VM, ReplicationState.ERROR, "why", "p1", 2
        frequency_s, compression, storage_dir = 300, False, Path("/r/web1")
        next_sequence, last_received_sequence, last_applied_sequence = 9, 8, 7
        last_replication_ns, last_applied_log_ns, last_applied_ns = 1, 2, 3
        disks = (Disk(),)

    out = ReplicaStatus.from_replica(Rep()).to_json()
    assert out["role"] == "replica" and out["state"] == "Error" and out["primary_server"] == "p1"
    assert out["storage"] == "/r/web1" and out["last_applied_time_ns"] == 3
    assert out["disks"] == [{"disk_id": str(D0), "name": "d0", "size_bytes": 4096, "path": "/r/web1/d0.img",
                             "initial_offset": 4096}]


def test_the_protocol_document_lists_every_code_as_the_catalogue_does():
    text = (REPO / "docs" / "replication-protocol.md").read_text(encoding="utf-8")
    for entry in CATALOGUE.values():
        row = (f"| `{entry.code}` | {entry.status} | {'yes' if entry.transient else 'no'} | {entry.exit_code} | "
               f"{entry.meaning} |")
        assert row in text, f"docs/replication-protocol.md lacks or misstates: {row}"
