"""The heartbeat: every ``heartbeat_s`` each relationship tells its replica whether the VM runs.

``running`` is true while any NBD client is connected to one of the VM's disks
(a prepared primary says false: it ships nothing more and takes no writer).
The replica server keeps the last heartbeat for its split-brain guard: it
refuses an unplanned failover while the primary answered recently and said
its VM runs (docs/failover.md).

Answers: 200 goes on; 409 ``stale_generation`` means the replica was failed
over: the relationship is fenced (:mod:`hvr_common.pure.fencing`) and no more
heartbeats go; 404 without a code of the replication API (an older listener
without the route) stops the heartbeats of that relationship, logged once;
any other failure is logged at debug level and the next beat tries again
(the cycles report those errors).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from hvr_common.pure.errors import HvrError
from hvr_common.pure.fencing import fenced_error, is_fenced_detail
from hvr_common.pure.replication_state import ReplicationState
from hvr_common.pure.wire.messages import HeartbeatRequest
from hvr_common.shell.logs import event
from hvr_agent.relationship import Relationship
from hvr_agent.replica_client import ReplicaClient, ReplicaNotFoundError

log = logging.getLogger("hvr.agent.heartbeat")


class Heartbeat:
    def __init__(self, rel: Relationship, interval_s: float, on_fenced: Callable[[HvrError], Awaitable[None]]):
        self.rel = rel
        self.interval_s = interval_s
        self.on_fenced = on_fenced
        self.last_answer: dict | None = None

    def beat(self) -> HeartbeatRequest:
        clients = self.rel.registry.nbd_clients(self.rel.name)
        prepared = self.rel.rec.state is ReplicationState.PREPARED_FOR_FAILOVER
        return HeartbeatRequest(running=clients > 0 and not prepared, nbd_clients=clients)

    async def run(self, client: ReplicaClient) -> None:
        """Beat until fenced, or the replica has no heartbeat route; cancelled with the relationship's task."""
        while await self.send(client):
            await asyncio.sleep(self.interval_s)  # the beat's own period

    async def send(self, client: ReplicaClient) -> bool:
        """One heartbeat; False when no more are to be sent."""
        rel = self.rel
        if is_fenced_detail(rel.name, rel.rec.state_detail):
            return False  # fenced: nothing more is sent
        try:
            self.last_answer = await client.heartbeat(rel.vm().record.vm_id, rel.rec.generation, self.beat())
        except ReplicaNotFoundError as exc:
            if exc.code != "http_error":
                event(log, "heartbeat_failed", logging.DEBUG, vm=rel.name, code=exc.code, error=exc.message)
                return True
            event(log, "heartbeat_unsupported", logging.WARNING, vm=rel.name, replica=str(client.endpoint),
                  hint="the replica server is older than this agent: its split-brain guard cannot see this VM; "
                       "upgrade hvr-listener there")
            return False
        except HvrError as exc:
            fenced = fenced_error(exc, rel.name, rel.rec.generation)
            if fenced is not None:
                await self.on_fenced(fenced)
                return False
            event(log, "heartbeat_failed", logging.DEBUG, vm=rel.name, code=exc.code, error=exc.message)
        return True
