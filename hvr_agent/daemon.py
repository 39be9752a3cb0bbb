"""The agent's composition root: owns every long-lived object and task."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil

from aiohttp import web

from hvr_common.block.nbd_server import NbdServer
from hvr_common.shell import systemd
from hvr_common.shell.http_middleware import serve_on_unix_socket
from hvr_common.shell.http_server import JsonErrorRunner
from hvr_common.pure.config import AgentConfig
from hvr_common.shell.logs import event
from hvr_common.shell.probe_server import make_probe_app, serve_probes
from hvr_common.shell.state_lock import claim_state_dir
from hvr_common.shell.unix_socket import claim_socket_path, release_socket_path, socket_identity
from hvr_agent.admin import make_app
from hvr_agent.exports import VmExports
from hvr_agent.failover import Failover
from hvr_agent.failover_admin import add_failover_routes
from hvr_agent.hooks import VmHooks
from hvr_agent.metrics import AgentMetrics
from hvr_agent.probes import AgentReadiness
from hvr_agent.replication import ReplicationManager
from hvr_agent.store import AgentStore
from hvr_agent.transfers import Transfers
from hvr_agent.vms import VmRegistry

log = logging.getLogger("hvr.agent")

VERSION = "0.1.0"


class Agent:
    def __init__(self, config: AgentConfig):
        self.config = config
        self._stop = asyncio.Event()
        self.readiness: AgentReadiness | None = None

    def request_stop(self, why: str) -> None:
        event(log, "agent_stopping", reason=why)
        if self.readiness is not None:
            self.readiness.stopping = True
        self._stop.set()

    async def run(self) -> None:
        cfg = self.config
        lock = claim_state_dir(cfg.state_dir, "hvr-agent")
        store = AgentStore(cfg.db_path)
        registry = VmRegistry(cfg, store)
        # The NBD server first: a removed VM's connections are dropped before its replication goes.
        nbd = NbdServer(VmExports(registry), logging.getLogger("hvr.agent.nbd"))
        registry.nbd_clients = nbd.group_clients
        transfers = Transfers(cfg.transfers, store)  # the bandwidth cap and parallel transfers
        replication = ReplicationManager(cfg, store, registry, transfers)
        failover = Failover(registry, replication, VmHooks(cfg.hooks, cfg.nbd_socket))
        runner: web.AppRunner | None = None
        probes: web.AppRunner | None = None
        self.readiness = readiness = AgentReadiness(registry, cfg.nbd_socket)
        owned: dict = {}  # socket path -> identity of the socket this process bound
        try:
            await registry.load_all()
            await failover.load()  # prepared VMs take no NBD client
            readiness.state_loaded = True
            claim_socket_path(cfg.nbd_socket)
            await nbd.listen_unix(cfg.nbd_socket)
            readiness.nbd_listening = True
            os.chmod(cfg.nbd_socket, 0o660)
            if cfg.nbd_socket_group:  # e.g. libvirt-qemu, so QEMU can connect without root
                shutil.chown(cfg.nbd_socket, group=cfg.nbd_socket_group)
            owned[cfg.nbd_socket] = socket_identity(cfg.nbd_socket)
            tcp_port = None
            if cfg.nbd_tcp:
                tcp_port = await nbd.listen_tcp(*cfg.nbd_tcp)
            status = {"daemon": "hvr-agent", "version": VERSION, "pid": os.getpid(),
                      "nbd_socket": str(cfg.nbd_socket), "nbd_tcp_port": tcp_port}
            app = make_app(registry, status, replication, transfers)
            add_failover_routes(app, failover)
            runner = JsonErrorRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            owned[cfg.admin_socket] = await serve_on_unix_socket(runner, cfg.admin_socket)
            if cfg.http_listen is not None:
                probe_app = make_probe_app(readiness.problems, AgentMetrics(replication, registry).sample, log)
                probes, bound = await serve_probes(probe_app, cfg.http_listen, log)
                status["http_port"] = bound[1]
            systemd.stop_on_signals(self.request_stop)
            event(log, "agent_ready", nbd_socket=str(cfg.nbd_socket), nbd_tcp_port=tcp_port,
                  admin_socket=str(cfg.admin_socket), vms=len(registry.vms))
            await systemd.serve_until(self._stop, replication.run(), lambda _task: replication.request_stop(),
                                      name="replication")
        finally:
            if probes is not None:
                await probes.cleanup()
            await nbd.close()
            await registry.close_all()
            if runner is not None:
                await runner.cleanup()
            store.close()
            lock.release()
            for path, identity in owned.items():
                release_socket_path(path, identity)
            event(log, "agent_stopped")
