"""The NBD server: an asyncio shell around :mod:`hvr_common.pure.nbd_protocol`.

It serves the exports of an :class:`~hvr_common.block.catalogue.ExportCatalogue`:
it feeds received bytes to the protocol core, executes the requests it emits
against the export's :class:`~hvr_common.block.blockdev.BlockDevice`, and
writes the replies.  Requests that can complete synchronously (reads, writes
the device can take at once) are answered within the same ``data_received``
call, and all their replies leave in one write; the rest (FLUSH, FUA, TRIM,
WRITE_ZEROES, writes the device must wait for) run as tasks and reply when
done.  Replies may be out of order, as the protocol allows.

A protocol violation closes only the offending connection, after logging it.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging

from hvr_common.block.blockdev import BlockDevice
from hvr_common.block.catalogue import ExportCatalogue
from hvr_common.pure.errors import HvrError
from hvr_common.pure.nbd_events import (
    NEED_DATA, Disconnect, ExportInfo, NbdProtocolError, Negotiated, Rejected, Request,
)
from hvr_common.pure.nbd_protocol import NbdServerConnection
from hvr_common.pure.nbd_wire import (
    BASE_ALLOCATION, CMD_BLOCK_STATUS, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLAG_REQ_ONE, CMD_FLUSH, CMD_READ,
    CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES, EINVAL, EIO, ENOSPC, EPERM, STATE_HOLE, STATE_ZERO,
)
from hvr_common.shell.logs import event

MAX_INFLIGHT_TASKS = 256


def _errno_of(exc: BaseException) -> int:
    if isinstance(exc, OSError):
        if exc.errno == errno.ENOSPC:
            return ENOSPC
        if exc.errno in (errno.EPERM, errno.EACCES, errno.EROFS):
            return EPERM
        if exc.errno == errno.EINVAL:
            return EINVAL
    return EIO


class NbdServer:
    """Owns the listening sockets and the live connections; serves ``catalogue``'s exports.

    Events are logged to ``logger`` (the daemon names it).
    """

    def __init__(self, catalogue: ExportCatalogue, logger: logging.Logger):
        self.catalogue = catalogue
        self.log = logger
        self.connections: set[NbdConnection] = set()
        self.servers: list[asyncio.AbstractServer] = []
        self.shutting_down = False
        self.connection_ids = itertools.count(1)
        catalogue.on_withdrawn(self.drop_group)

    def export_info(self, name: str) -> ExportInfo | None:
        found = self.catalogue.lookup(name)
        return found.info if found is not None else None

    def _factory(self):
        return NbdConnection(self)

    async def listen_unix(self, path) -> None:
        loop = asyncio.get_running_loop()
        srv = await loop.create_unix_server(self._factory, path=str(path), backlog=128)
        self.servers.append(srv)

    async def listen_tcp(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(self._factory, host, port, backlog=128, reuse_address=True)
        self.servers.append(srv)
        return srv.sockets[0].getsockname()[1]

    def group_clients(self, group: str) -> int:
        """How many connections are attached to an export of ``group`` (the agent: a VM's disks)."""
        return sum(1 for conn in self.connections if conn.group == group and not conn.closing)

    def drop_group(self, group: str, reason: str) -> None:
        """Close every connection to an export of ``group`` (its exports were withdrawn)."""
        for conn in list(self.connections):
            if conn.group == group:
                conn.close(reason)

    async def wait_group_idle(self, group: str) -> None:
        """Wait until the requests in flight on ``group``'s connections have finished (after a withdrawal:
        then nothing writes to the group's devices any more)."""
        for conn in [c for c in self.connections if c.group == group]:
            await conn.wait_tasks()

    async def close(self) -> None:
        self.shutting_down = True
        for srv in self.servers:
            srv.close()
        for conn in list(self.connections):
            conn.close("shutdown")
        for conn in list(self.connections):
            await conn.wait_tasks()
        for srv in self.servers:
            await srv.wait_closed()


class NbdConnection(asyncio.Protocol):
    def __init__(self, server: NbdServer):
        self.server = server
        self.log = server.log
        self.id = next(server.connection_ids)
        self.proto = NbdServerConnection(server.export_info, server.catalogue.exports,
                                         shutting_down=lambda: server.shutting_down)
        self.transport: asyncio.Transport | None = None
        self.device: BlockDevice | None = None
        self.export_name: str | None = None
        self.group: str | None = None
        self.tasks: set[asyncio.Task] = set()
        self.closing = False
        self._disconnect_requested = False
        self._paused_reading = False
        self._reading_paused_by_tasks = False
        self._writable = asyncio.Event()
        self._writable.set()
        self.peer = None

    # --- asyncio callbacks ------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.peer = transport.get_extra_info("peername") or "unix"
        self.server.connections.add(self)
        transport.write(self.proto.greeting())

    def connection_lost(self, exc) -> None:
        self.server.connections.discard(self)
        self.closing = True
        for t in self.tasks:
            t.cancel()
        if self.export_name:
            event(self.log, "nbd_disconnected", logging.DEBUG, conn=self.id, export=self.export_name)

    def pause_writing(self) -> None:
        self._writable.clear()
        if not self._paused_reading:
            self._paused_reading = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._writable.set()
        if self._paused_reading and not self._reading_paused_by_tasks:
            self._paused_reading = False
            self.transport.resume_reading()

    def close(self, why: str) -> None:
        if self.transport is not None and not self.closing:
            self.closing = True
            event(self.log, "nbd_connection_closed", conn=self.id, export=self.export_name, reason=why)
            self.transport.close()

    async def wait_tasks(self) -> None:
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)

    # --- the hot path -----------------------------------------------------
    def data_received(self, data: bytes) -> None:
        proto = self.proto
        proto.receive_data(data)
        out: list = []
        next_event = proto.next_event
        try:
            while not self.closing and not self._disconnect_requested:
                ev = next_event()
                if type(ev) is not Request:
                    if ev is NEED_DATA:
                        break
                    self._control_event(ev)
                elif (ev.cmd == CMD_WRITE and not ev.flags and ev.length
                      and self.device.can_write_now(ev.offset, ev.length)):
                    # The common case inline: a plain write the device takes at once completes now.
                    try:
                        self.device.write_now(ev.offset, ev.data)
                    except OSError as exc:
                        out.append(self._io_error_reply(ev, exc))
                    else:
                        out.append(proto.reply_ok(ev.handle))
                else:
                    self._dispatch(ev, out)
        except NbdProtocolError as exc:
            pending = proto.data_to_send()
            if pending:
                out.append(pending)
            if out:
                self.transport.writelines(out)
            event(self.log, "nbd_protocol_error", logging.WARNING, conn=self.id, peer=str(self.peer),
                  export=self.export_name, error=str(exc))
            self.close("protocol_error")
            return
        pending = proto.data_to_send()
        if pending:
            out.append(pending)
        if out and not self.transport.is_closing():
            # One write of the joined replies: far cheaper than writelines of many small ones.
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        if self._disconnect_requested and not self.tasks:
            self.close("client_disconnect")  # after the replies above (e.g. the ACK of NBD_OPT_ABORT)

    def _control_event(self, ev) -> None:
        if type(ev) is Negotiated:
            found = self.server.catalogue.lookup(ev.export.name)
            if found is None:  # withdrawn between lookup and now
                raise NbdProtocolError(f"export {ev.export.name!r} disappeared")
            self.device = found.device
            self.export_name = found.name
            self.group = found.group
            event(self.log, "nbd_connected", logging.DEBUG, conn=self.id, export=self.export_name,
                  structured=ev.structured_replies)
        elif type(ev) is Rejected:
            event(self.log, "nbd_request_rejected", logging.INFO, conn=self.id, export=self.export_name,
                  cmd=ev.cmd, offset=ev.offset, length=ev.length, errno=ev.error, reason=ev.message)
        elif type(ev) is Disconnect:
            # Replies still owed are sent by their tasks before the transport closes.
            self._disconnect_requested = True
            if self.tasks:
                asyncio.ensure_future(self._close_after_tasks())

    async def _close_after_tasks(self) -> None:
        await self.wait_tasks()
        self.close("client_disconnect")

    def _dispatch(self, req: Request, out: list) -> None:
        device = self.device
        cmd = req.cmd
        proto = self.proto
        try:
            if cmd == CMD_WRITE:
                if not req.flags & CMD_FLAG_FUA and req.length and device.can_write_now(req.offset, req.length):
                    device.write_now(req.offset, req.data)
                    out.append(proto.reply_ok(req.handle))
                    return
                self._spawn(req, device.write(req.offset, req.data, bool(req.flags & CMD_FLAG_FUA)))
            elif cmd == CMD_READ:
                if req.length:
                    data = device.pread(req.offset, req.length)
                    out.append(proto.read_reply_header(req.handle, req.offset, req.length))
                    out.append(data)
                else:
                    out.append(proto.read_reply_header(req.handle, req.offset, 0))
            elif cmd == CMD_FLUSH:
                if device.read_only:
                    out.append(proto.reply_ok(req.handle))
                else:
                    self._spawn(req, device.flush())
            elif cmd == CMD_TRIM:
                self._spawn(req, device.trim(req.offset, req.length, bool(req.flags & CMD_FLAG_FUA)))
            elif cmd == CMD_WRITE_ZEROES:
                may_trim = not req.flags & CMD_FLAG_NO_HOLE
                self._spawn(req, device.write_zeroes(req.offset, req.length, may_trim,
                                                     bool(req.flags & CMD_FLAG_FUA)))
            elif cmd == CMD_BLOCK_STATUS:
                out.append(self._block_status(req))
            else:  # the protocol core only emits the commands above
                out.append(proto.reply_error(req.handle, EINVAL, f"command {cmd} not handled"))
        except OSError as exc:
            out.append(self._io_error_reply(req, exc))

    def _io_error_reply(self, req: Request, exc: OSError) -> bytes:
        event(self.log, "nbd_io_error", logging.ERROR, conn=self.id, export=self.export_name, cmd=req.cmd,
              offset=req.offset, length=req.length, error=str(exc))
        return self.proto.reply_error(req.handle, _errno_of(exc), f"I/O error: {exc.strerror}")

    def _block_status(self, req: Request) -> bytes:
        proto = self.proto
        ctx_id = next((i for i, name in proto.meta_contexts.items() if name == BASE_ALLOCATION), None)
        if ctx_id is None:
            return proto.reply_error(req.handle, EINVAL, "base:allocation was not negotiated")
        runs = self.device.extents(req.offset, req.length)
        extents = []
        for _off, length, is_data in runs:
            flags = 0 if is_data else (STATE_HOLE | STATE_ZERO)
            if extents and extents[-1][1] == flags:
                extents[-1] = (extents[-1][0] + length, flags)
            else:
                extents.append((length, flags))
        if req.flags & CMD_FLAG_REQ_ONE:
            extents = extents[:1]
        # Lengths are 32-bit on the wire: split longer runs.
        wire = []
        for length, flags in extents:
            while length > 0xFFFFF000:
                wire.append((0xFFFFF000, flags))
                length -= 0xFFFFF000
            wire.append((length, flags))
        return proto.reply_block_status(req.handle, ctx_id, wire)

    def _spawn(self, req: Request, coro) -> None:
        task = asyncio.get_running_loop().create_task(self._complete(req, coro))
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        if len(self.tasks) >= MAX_INFLIGHT_TASKS and not self._paused_reading:
            self._paused_reading = True
            self._reading_paused_by_tasks = True
            self.transport.pause_reading()

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if self._reading_paused_by_tasks and len(self.tasks) < MAX_INFLIGHT_TASKS // 2 and not self.closing:
            self._reading_paused_by_tasks = False
            if self._writable.is_set():
                self._paused_reading = False
                self.transport.resume_reading()

    async def _complete(self, req: Request, coro) -> None:
        proto = self.proto
        try:
            await coro
            reply = proto.reply_ok(req.handle)
        except asyncio.CancelledError:
            raise
        except OSError as exc:
            event(self.log, "nbd_io_error", logging.ERROR, conn=self.id, export=self.export_name, cmd=req.cmd,
                  offset=req.offset, length=req.length, error=str(exc))
            reply = proto.reply_error(req.handle, _errno_of(exc), f"I/O error: {exc.strerror}")
        except HvrError as exc:
            event(self.log, "nbd_request_failed", logging.ERROR, conn=self.id, export=self.export_name,
                  cmd=req.cmd, error=str(exc))
            reply = proto.reply_error(req.handle, EIO, exc.message)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(reply)
