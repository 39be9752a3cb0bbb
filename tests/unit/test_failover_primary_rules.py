"""Failover rules on the agent that need no daemon: the heartbeat's answers, fencing, the [hooks] table.

The heartbeat's 409 and 200 answers are made by a stand-in client: the
listener of this tree has no heartbeat route yet (its 404 is tested for real
in tests/daemon/test_failover_agent.py).
"""

from __future__ import annotations

import asyncio
import uuid
from types import SimpleNamespace

import pytest

from hvr_common.pure.config import parse_agent_config
from hvr_common.pure.errors import ConfigError
from hvr_common.pure.fencing import fenced_detail, fenced_error, is_fenced_detail
from hvr_common.pure.lifecycle_hooks import LifecycleHooks
from hvr_common.pure.replication_state import Action, InvalidTransition, ReplicationState, transition
from hvr_agent.heartbeat import Heartbeat
from hvr_agent.replica_client import ReplicaConflictError, ReplicaNotFoundError

S = ReplicationState


class Client:
    endpoint = "127.0.0.1:1"

    def __init__(self, answer):
        self.answer = answer
        self.sent = []

    async def heartbeat(self, vm_id, generation, beat):
        self.sent.append((generation, beat))
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def relationship(state=S.REPLICATING, clients=0, detail=None):
    rec = SimpleNamespace(state=state, state_detail=detail, generation=1)
    vm = SimpleNamespace(record=SimpleNamespace(vm_id=uuid.uuid4()))
    return SimpleNamespace(name="web", rec=rec, vm=lambda: vm,
                           registry=SimpleNamespace(nbd_clients=lambda _name: clients))


def beat(rel, answer):
    fenced = []

    async def on_fenced(exc):
        fenced.append(exc)
    client = Client(answer)
    go_on = asyncio.run(Heartbeat(rel, 1, on_fenced).send(client))
    return go_on, client.sent, fenced


def test_a_heartbeat_says_whether_the_vm_runs_and_a_prepared_vm_never_runs():
    go_on, sent, _ = beat(relationship(clients=2), {"generation": 1, "state": "Replicating"})
    assert go_on and sent[0][0] == 1 and (sent[0][1].running, sent[0][1].nbd_clients) == (True, 2)
    _, sent, _ = beat(relationship(clients=0), {})
    assert sent[0][1].running is False
    _, sent, _ = beat(relationship(S.PREPARED_FOR_FAILOVER, clients=1), {})
    assert sent[0][1].running is False


def test_a_stale_generation_answer_fences_and_stops_the_heartbeats():
    refusal = ReplicaConflictError("replica server: request is for generation 1", status=409,
                                   remote_code="stale_generation", detail={"generation": 2})
    go_on, _, fenced = beat(relationship(), refusal)
    assert go_on is False and fenced[0].code == "stale_generation"
    assert fenced[0].message.startswith("VM web was failed over at the replica server (generation 2 there, 1 here)")
    assert is_fenced_detail("web", fenced[0].message)
    go_on, sent, _ = beat(relationship(S.ERROR, detail=fenced[0].message), {})
    assert go_on is False and sent == []  # fenced: nothing more is sent


def test_an_older_listener_without_the_route_stops_the_heartbeats_other_failures_do_not():
    no_route = ReplicaNotFoundError("replica server: not found", status=404, remote_code="http_error")
    assert beat(relationship(), no_route)[0] is False
    unknown = ReplicaNotFoundError("replica server: no such VM", status=404, remote_code="unknown_vm")
    assert beat(relationship(), unknown)[0] is True


def test_fencing_sentence_and_only_stale_generation_fences():
    text = fenced_detail("db1", 4, 3)
    assert "generation 4 there, 3 here" in text and "hvrctl replica adopt db1 --from-agent" in text
    other = ReplicaConflictError("x", status=409, remote_code="out_of_order")
    assert fenced_error(other, "db1", 3) is None


def test_prepare_and_cancel_are_rows_of_the_state_table():
    assert transition("primary", S.REPLICATING, Action.PREPARE_FAILOVER) is S.PREPARED_FOR_FAILOVER
    assert transition("primary", S.PREPARED_FOR_FAILOVER, Action.PREPARE_FAILOVER) is S.PREPARED_FOR_FAILOVER
    assert transition("primary", S.PREPARED_FOR_FAILOVER, Action.CANCEL_FAILOVER) is S.REPLICATING
    for state in (S.SUSPENDED, S.ERROR, S.RESYNCHRONIZING, S.INITIAL_REPLICATION_IN_PROGRESS):
        with pytest.raises(InvalidTransition):
            transition("primary", state, Action.PREPARE_FAILOVER)
    with pytest.raises(InvalidTransition):  # a prepared primary that is fenced keeps its state
        transition("primary", S.PREPARED_FOR_FAILOVER, Action.FAIL)


BASE = {"state_dir": "/var/lib/hvr", "admin_socket": "/run/hvr/a.sock", "nbd_socket": "/run/hvr/n.sock"}


def test_hooks_table_and_heartbeat_interval_are_read_and_checked():
    cfg = parse_agent_config(dict(BASE, heartbeat_s=3, hooks={
        "stop_vm": ["/usr/local/bin/hvr-hooks.sh", "stop", "{name}"],
        "define_vm": ["/x", "{vm_id}", "{nbd_socket}", "{export}"], "hook_timeout_s": 30}))
    assert cfg.heartbeat_s == 3 and cfg.hooks.timeout_s == 30 and cfg.hooks.start_vm == ()
    assert cfg.hooks.argv("define_vm", {"name": "web", "vm_id": "V", "nbd_socket": "/s", "export": "web/sys"}) == [
        "/x", "V", "/s", "web/sys"]
    assert cfg.hooks.argv("start_vm", {}) == []
    assert parse_agent_config(dict(BASE)).hooks == LifecycleHooks() and parse_agent_config(BASE).heartbeat_s == 10
    with pytest.raises(ConfigError) as bad:
        parse_agent_config(dict(BASE, heartbeat_s=0, hooks={"stop_vm": "virsh shutdown", "hook_timeout_s": 0,
                                                             "start": ["x"]}))
    problems = "\n".join(bad.value.problems)
    for key in ("heartbeat_s", "hooks.stop_vm", "hooks.hook_timeout_s", "hooks.start: unknown key"):
        assert key in problems
