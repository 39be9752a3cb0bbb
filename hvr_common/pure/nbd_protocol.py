"""The NBD protocol, server side, as a sans-I/O state machine.

Bytes go in with :meth:`NbdServerConnection.receive_data`; events
(:mod:`hvr_common.pure.nbd_events`) come out of
:meth:`NbdServerConnection.next_event`; bytes to send are taken with
:meth:`NbdServerConnection.data_to_send` or returned by the ``reply_*``
methods.  Nothing here touches a socket or a file, so every rule of the
protocol (NetworkBlockDevice/nbd ``doc/proto.md``) is tested without I/O.

The handshake and option haggling are :class:`~hvr_common.pure.nbd_handshake.NbdHandshake`;
this module holds the connection's byte plumbing and the transmission phase,
where every valid request becomes a ``Request`` event.  A request that breaks
a rule the server can answer (bounds, read-only export, bad flags) never
reaches the shell: its error reply is queued here and a ``Rejected`` event
reports it.  A violation that leaves the byte stream unusable raises
``NbdProtocolError``, after which the shell closes that connection.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from hvr_common.pure.nbd_events import (
    NEED_DATA, Disconnect, ExportInfo, ListExports, Lookup, NbdProtocolError, OptionHandled, Phase, Rejected,
    Request,
)
from hvr_common.pure.nbd_handshake import NbdHandshake
from hvr_common.pure.nbd_wire import (
    CMD_BLOCK_STATUS, CMD_DISC, CMD_FLAG_DF, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLAG_REQ_ONE, CMD_FLUSH,
    CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES, EINVAL, ENOSPC, EPERM, ERROR_CHUNK, EXTENT, MAX_PAYLOAD,
    MAX_STRING, OFFSET_DATA_HEAD, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_ERROR,
    REPLY_TYPE_OFFSET_DATA, REQUEST, REQUEST_MAGIC, SIMPLE_REPLY, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY,
    STRUCTURED_REPLY_MAGIC, U32, Cmd, utf8_prefix,
)

# flags each command accepts (FUA is valid on every command once SEND_FUA is
# advertised; it only means something for the ones that write)
_ALLOWED_FLAGS = {
    CMD_READ: CMD_FLAG_DF | CMD_FLAG_FUA,
    CMD_WRITE: CMD_FLAG_FUA,
    CMD_DISC: CMD_FLAG_FUA,
    CMD_FLUSH: CMD_FLAG_FUA,
    CMD_TRIM: CMD_FLAG_FUA,
    CMD_WRITE_ZEROES: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
    CMD_BLOCK_STATUS: CMD_FLAG_REQ_ONE | CMD_FLAG_FUA,
}

_READ_FLAGS = _ALLOWED_FLAGS[CMD_READ]

LARGE_PAYLOAD = 64 * 1024  # WRITE payloads from this size are gathered chunk-wise


class NbdServerConnection(NbdHandshake):
    """One server-side NBD connection."""

    def __init__(self, lookup: Lookup, list_exports: ListExports, *,
                 max_payload: int = MAX_PAYLOAD, shutting_down: Callable[[], bool] | None = None):
        self._lookup = lookup
        self._list_exports = list_exports
        self._shutting_down = shutting_down or (lambda: False)
        self.max_payload = max_payload
        self.phase = Phase.CLIENT_FLAGS
        self._buf = bytearray()
        self._pos = 0
        self._out = bytearray()
        self._discard = 0  # payload bytes still to be dropped
        self._discard_then: tuple | None = None
        # A large WRITE payload is gathered as the received chunks themselves
        # and joined once, instead of being copied through the buffer.
        self._chunks: list | None = None
        self._chunks_need = 0
        self._chunks_req: tuple | None = None
        self.no_zeroes = False
        self.structured_replies = False
        self.export: ExportInfo | None = None
        self._meta_export: str | None = None
        self._meta_contexts: dict[int, str] = {}
        self.meta_contexts: dict[int, str] = {}

    # --- byte plumbing ----------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        if self._chunks is not None and self._chunks_need:
            if type(data) is not bytes:  # chunks are kept: never hold on to a caller's mutable buffer
                data = bytes(data)
            need = self._chunks_need
            if len(data) <= need:
                self._chunks.append(data)
                self._chunks_need = need - len(data)
                return
            self._chunks.append(data[:need])
            self._chunks_need = 0
            data = data[need:]
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        self._buf += data

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def _compact(self) -> None:
        if self._pos > 65536 and self._pos * 2 > len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0

    # --- event loop -------------------------------------------------------
    def next_event(self):
        if self.phase is Phase.TRANSMISSION:
            return self._next_request()
        if self._discard:
            done = self._drop_discard()
            if done is False:
                return NEED_DATA
            if isinstance(done, OptionHandled):
                return done
        if self.phase is Phase.CLIENT_FLAGS:
            return self._client_flags()
        if self.phase is Phase.OPTIONS:
            return self._next_option()
        return NEED_DATA

    def _drop_discard(self):
        """Drop discarded bytes; False while some remain, then the event to report (or True)."""
        avail = len(self._buf) - self._pos
        n = min(avail, self._discard)
        self._pos += n
        self._discard -= n
        self._compact()
        if self._discard:
            return False
        then, self._discard_then = self._discard_then, None
        if then is not None:
            kind, args = then
            if kind == "option":
                option, reply, msg = args
                self._option_reply(option, reply, utf8_prefix(msg, MAX_STRING))
                return OptionHandled(option, reply, msg)
            if kind == "request":
                self._reject(*args)
        return True

    # --- transmission -----------------------------------------------------
    def _next_request(self):
        if self._discard and self._drop_discard() is False:
            return NEED_DATA
        if self._chunks is not None:
            if self._chunks_need:
                return NEED_DATA
            data = b"".join(self._chunks)
            self._chunks = None
            flags, handle, offset, length = self._chunks_req
            return self._validated(CMD_WRITE, flags, handle, offset, length, data)
        buf = self._buf
        pos = self._pos
        if len(buf) - pos < 28:
            if pos == len(buf) and pos:
                buf.clear()
                self._pos = 0
            return NEED_DATA
        magic, flags, cmd, handle, offset, length = REQUEST.unpack_from(buf, pos)
        if magic != REQUEST_MAGIC:
            self.phase = Phase.CLOSED
            raise NbdProtocolError(f"bad request magic {magic:#x}")
        if cmd == CMD_WRITE:
            if length > self.max_payload:
                self._pos = pos + 28
                self._discard = length
                msg = f"write of {length} bytes exceeds the maximum payload {self.max_payload}"
                self._discard_then = ("request", (cmd, flags, handle, offset, length, EINVAL, msg))
                self._drop_discard()  # the reply is queued once the payload is gone
                return Rejected(cmd, handle, offset, length, EINVAL, msg)
            end = pos + 28 + length
            if len(buf) < end:
                if length < LARGE_PAYLOAD:
                    return NEED_DATA
                self._chunks = [bytes(memoryview(buf)[pos + 28:])]
                self._chunks_need = end - len(buf)
                self._chunks_req = (flags, handle, offset, length)
                buf.clear()
                self._pos = 0
                return NEED_DATA
            with memoryview(buf) as view:
                data = bytes(view[pos + 28:end])
            self._pos = end
        else:
            data = None
            self._pos = pos + 28
        if self._pos > 65536 and self._pos * 2 > len(buf):
            del buf[: self._pos]
            self._pos = 0
        # Fast accept of the common in-bounds READ and WRITE; anything else gets the full check.
        export = self.export
        if cmd == CMD_WRITE:
            if not flags & ~CMD_FLAG_FUA and offset + length <= export.size and not export.read_only:
                return Request(cmd, flags, handle, offset, length, data)
        elif cmd == CMD_READ:
            if (not flags & ~_READ_FLAGS and length <= self.max_payload
                    and offset + length <= export.size):
                return Request(cmd, flags, handle, offset, length, data)
        return self._validated(cmd, flags, handle, offset, length, data)

    def _validated(self, cmd: int, flags: int, handle: int, offset: int, length: int, data):
        err = self._check(cmd, flags, offset, length)
        if err is not None:
            self._reject(cmd, flags, handle, offset, length, *err)
            return Rejected(cmd, handle, offset, length, *err)
        if cmd == CMD_DISC:
            self.phase = Phase.CLOSED
            return Disconnect("transmission")
        return Request(cmd, flags, handle, offset, length, data)

    def _check(self, cmd: int, flags: int, offset: int, length: int):
        export = self.export
        allowed = _ALLOWED_FLAGS.get(cmd)
        if allowed is None:
            return EINVAL, f"unsupported command {cmd}"
        if flags & ~allowed:
            return EINVAL, f"flags {flags:#x} not allowed on command {Cmd(cmd).name}"
        if cmd in (CMD_FLUSH, CMD_DISC):
            return None
        if cmd in (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES) and export.read_only:
            return EPERM, "export is read-only"
        if cmd == CMD_READ and length > self.max_payload:
            return EINVAL, f"read of {length} bytes exceeds the maximum payload {self.max_payload}"
        if offset + length > export.size:
            err = ENOSPC if cmd in (CMD_WRITE, CMD_WRITE_ZEROES) and offset <= export.size else EINVAL
            return err, f"range {offset}+{length} is beyond the export size {export.size}"
        if cmd == CMD_BLOCK_STATUS:
            if not self.meta_contexts:
                return EINVAL, "no meta context was negotiated"
            if length == 0:
                return EINVAL, "block status of zero length"
        return None

    def _reject(self, cmd, flags, handle, offset, length, error, message):
        self._out += self.reply_error(handle, error, message)

    # --- replies ----------------------------------------------------------
    def reply_ok(self, handle: int) -> bytes:
        return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, handle)

    def reply_error(self, handle: int, error: int, message: str = "") -> bytes:
        if not self.structured_replies:
            return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)
        msg = utf8_prefix(message, MAX_STRING)
        return (STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, handle,
                                      6 + len(msg)) + ERROR_CHUNK.pack(error, len(msg)) + msg)

    def read_reply_header(self, handle: int, offset: int, length: int) -> bytes:
        """Header to send before ``length`` bytes of read data."""
        if not self.structured_replies:
            return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, handle)
        return OFFSET_DATA_HEAD.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA,
                                     handle, 8 + length, offset)

    def reply_block_status(self, handle: int, context_id: int, extents: Iterable[tuple[int, int]],
                           *, done: bool = True) -> bytes:
        body = bytearray(U32.pack(context_id))
        for length, flags in extents:
            body += EXTENT.pack(length, flags)
        return STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0,
                                     REPLY_TYPE_BLOCK_STATUS, handle, len(body)) + bytes(body)
