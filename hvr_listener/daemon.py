"""The listener's composition root: owns the store, the APIs, the applier, recovery history and the
NBD server of test failovers."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from aiohttp import web

from hvr_common.shell import systemd, tls_contexts
from hvr_common.shell.http_middleware import serve_on_unix_socket
from hvr_common.shell.http_server import JsonErrorRunner
from hvr_common.pure.config import ListenerConfig
from hvr_common.pure.errors import ConflictError
from hvr_common.shell.logs import event
from hvr_common.shell.probe_server import make_probe_app, serve_probes
from hvr_common.shell.state_lock import claim_state_dir
from hvr_common.block.catalogue import Catalogues
from hvr_common.block.nbd_server import NbdServer
from hvr_common.shell.unix_socket import claim_socket_path, release_socket_path, socket_identity
from hvr_listener import admin, replication_api
from hvr_listener.applier import Applier
from hvr_listener.backups import Backups
from hvr_listener.failover import Failovers
from hvr_listener.metrics import ListenerMetrics
from hvr_listener.probes import ListenerReadiness
from hvr_common.shell.files import unlink_if_exists
from hvr_listener.peer_connections import PeerConnections
from hvr_listener.recovery_history import Histories
from hvr_listener.replicas import ReplicaService
from hvr_listener.test_failover import TestFailovers
from hvr_listener.settings import ServerSettings, configured_tls
from hvr_listener.store import ListenerStore

log = logging.getLogger("hvr.listener")

SHUTDOWN_TIMEOUT_S = 10.0


def cleanup_leftovers(store: ListenerStore) -> int:
    """Remove partial uploads, staged streamed bodies and files of cycles already applied (crash leftovers)."""
    removed = 0
    for rep in store.replicas():
        incoming = rep.storage_dir / "incoming"
        for part in [*incoming.glob("*.part"), *incoming.glob("*.staged")]:
            unlink_if_exists(part)
            removed += 1
        for row in store.cycle_history(rep.vm_id):
            if row.applied_ns is not None and row.path.exists():
                row.path.unlink()
                removed += 1
    return removed


class Listener:
    def __init__(self, config: ListenerConfig):
        self.config = config
        self._stop = asyncio.Event()
        self._api_runner: web.AppRunner | None = None
        self._api_site: web.TCPSite | None = None
        self._bound_for: tuple[str, int] | None = None  # the listen setting of the current site
        self.settings: ServerSettings | None = None
        self.readiness: ListenerReadiness | None = None
        self.peers = PeerConnections()  # open connections of authenticated primaries

    def close_revoked_connections(self, reason: str) -> int:
        """Close the connections of principals no longer allowed (after a trusted CA, a key or an entry went)."""
        return self.peers.close_revoked(self.settings.still_allowed, reason)

    def request_stop(self, why: str) -> None:
        event(log, "listener_stopping", reason=why)
        if self.readiness is not None:
            self.readiness.stopping = True
        self._stop.set()

    async def _bind(self) -> None:
        """Listen where the settings say, with their TLS context; a change of TLS alone rebinds in place."""
        endpoint = self.settings.listen_endpoint()
        host, port = endpoint
        ssl_context = self._tls_context()
        old = self._api_site
        if old is not None and endpoint == self._bound_for:  # the same address: the old socket must go first
            host, port = self.bound
            await old.stop()
            old = None
        site = web.TCPSite(self._api_runner, host, port, reuse_address=True, ssl_context=ssl_context)
        try:
            await site.start()
        except OSError as exc:
            raise ConflictError(f"cannot listen on {host}:{port}: {exc.strerror}",
                                hint="another process uses the port, or the address is not on this host") from None
        self._api_site, self._bound_for = site, endpoint
        if old is not None:
            await old.stop()
        bound = site._server.sockets[0].getsockname()[:2] if site._server and site._server.sockets else (host, port)
        self.bound = bound
        self.settings.bound = bound
        event(log, "listening", host=bound[0], port=bound[1])

    def _tls_context(self):
        """TLS 1.3 when the server has a certificate (docs/security.md), else None: plain HTTP."""
        files = self.settings.tls_files()
        if files is None:
            return None
        return tls_contexts.server_context(files, require_client_cert=self.settings.requires_client_certificate())

    async def run(self) -> None:
        cfg = self.config
        lock = claim_state_dir(cfg.state_dir, "hvr-listener")
        cfg.storage.mkdir(parents=True, exist_ok=True)
        store = ListenerStore(cfg.db_path)
        admin_runner = None
        probes = None
        admin_identity = None
        histories = Histories(store)
        nbd: NbdServer | None = None
        tests: TestFailovers | None = None
        backups: Backups | None = None
        nbd_identity = None
        try:
            removed = await asyncio.to_thread(cleanup_leftovers, store)
            if removed:
                event(log, "leftovers_removed", files=removed)
            self.settings = ServerSettings(store, cfg.server_name or os.uname().nodename, cfg.listen, str(cfg.storage),
                                           configured_tls(cfg.tls_cert, cfg.tls_key, cfg.tls_ca),
                                           cfg.max_active_applies)
            await asyncio.to_thread(self.settings.check_tls)  # unusable certificate files: refuse to start
            service = ReplicaService(store, cfg.max_bundle_bytes)
            peers = self.peers
            applier = Applier(service, histories, self.settings.applies)
            tests = TestFailovers(store, service.access, histories, cfg.nbd_socket)
            backups = Backups(store, service.access, histories, cfg.nbd_socket, applier.interrupted,
                              resync_running=service.resync_activity.running)
            failovers = Failovers(service, histories, cfg.primary_alive_s, backups.status)
            ended = await tests.end_leftovers()
            await asyncio.to_thread(histories.load_all, store.replicas())
            if cfg.nbd_socket is not None:
                nbd = NbdServer(Catalogues(tests, backups), logging.getLogger("hvr.listener.nbd"))
                tests.quiesce = backups.quiesce = nbd.wait_group_idle
                claim_socket_path(cfg.nbd_socket)
                await nbd.listen_unix(cfg.nbd_socket)
                os.chmod(cfg.nbd_socket, 0o660)
                nbd_identity = socket_identity(cfg.nbd_socket)
            # A primary that vanishes mid-upload cancels its handler (and frees the VM's lock);
            # a stop waits at most SHUTDOWN_TIMEOUT_S for requests in flight.
            api = replication_api.make_app(service, self.settings, cfg.max_bundle_bytes, peers)
            self._api_runner = JsonErrorRunner(api,
                                             access_log=None, handle_signals=False, handler_cancellation=True,
                                             shutdown_timeout=SHUTDOWN_TIMEOUT_S,
                                             read_bufsize=replication_api.BODY_CHUNK)
            await self._api_runner.setup()
            await self._bind()
            admin_runner = JsonErrorRunner(admin.make_app(self.settings, store, self._bind, service, histories, tests,
                                                        backups, peers, failovers),
                                         access_log=None,
                                         handle_signals=False)
            await admin_runner.setup()
            admin_identity = await serve_on_unix_socket(admin_runner, cfg.admin_socket)
            if cfg.http_listen is not None:
                self.readiness = ListenerReadiness(self.settings)
                probe_app = make_probe_app(self.readiness.problems, ListenerMetrics(store).sample, log)
                probes, self.http_bound = await serve_probes(probe_app, cfg.http_listen, log)
            systemd.stop_on_signals(self.request_stop)
            event(log, "listener_ready", admin_socket=str(cfg.admin_socket), host=self.bound[0], port=self.bound[1],
                  enabled=self.settings.current()["enabled"],
                  nbd_socket=str(cfg.nbd_socket) if cfg.nbd_socket else None, test_failovers_ended=ended)
            await systemd.serve_until(self._stop, applier.run(), lambda task: task.cancel(), name="applier")
        finally:
            if nbd is not None:  # first: no request in flight writes an overlay once it is closed
                await nbd.close()
                release_socket_path(Path(cfg.nbd_socket), nbd_identity)
            if tests is not None:
                await tests.close()
            if backups is not None:
                await backups.close()
            if probes is not None:
                await probes.cleanup()
            if self._api_runner is not None:
                await self._api_runner.cleanup()
            if admin_runner is not None:
                await admin_runner.cleanup()
            histories.close()
            store.close()
            lock.release()
            release_socket_path(Path(cfg.admin_socket), admin_identity)
            event(log, "listener_stopped")
