"""The NBD protocol, server side, as a sans-I/O state machine.

Bytes go in with :meth:`NbdServerConnection.receive_data`; events come out of
:meth:`NbdServerConnection.next_event`; bytes to send are taken with
:meth:`NbdServerConnection.data_to_send` or returned by the ``reply_*``
methods.  Nothing here touches a socket or a file, so every rule of the
protocol (NetworkBlockDevice/nbd ``doc/proto.md``) is tested without I/O.

Only the fixed-newstyle handshake is spoken.  Option haggling is answered
entirely by this module (it asks the ``lookup``/``list_exports`` callables for
export information); once an export is chosen a :class:`Negotiated` event is
emitted and the connection is in the transmission phase, where every valid
request becomes a :class:`Request` event.  A request that breaks a rule the
server can answer (bounds, read-only export, bad flags) never reaches the
shell: its error reply is queued here and a :class:`Rejected` event reports
it.  A violation that leaves the byte stream unusable raises
:class:`NbdProtocolError`, after which the shell closes that connection.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from hvr_common.pure.errors import HvrError

# --- magic numbers and constants (big-endian on the wire) ------------------
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# handshake flags
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
# client flags
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1
KNOWN_CLIENT_FLAGS = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES

# transmission flags
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_ROTATIONAL = 1 << 4
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8


class Opt(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
_REP_ERR = 1 << 31
REP_ERR_UNSUP = _REP_ERR | 1
REP_ERR_POLICY = _REP_ERR | 2
REP_ERR_INVALID = _REP_ERR | 3
REP_ERR_PLATFORM = _REP_ERR | 4
REP_ERR_TLS_REQD = _REP_ERR | 5
REP_ERR_UNKNOWN = _REP_ERR | 6
REP_ERR_SHUTDOWN = _REP_ERR | 7
REP_ERR_BLOCK_SIZE_REQD = _REP_ERR | 8
REP_ERR_TOO_BIG = _REP_ERR | 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3


class Cmd(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = range(8)

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

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

# errno values of the protocol
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) | 1
REPLY_FLAG_DONE = 1 << 0

BASE_ALLOCATION = "base:allocation"
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

MAX_PAYLOAD = 32 * 1024 * 1024
MAX_OPTION_LENGTH = 64 * 1024  # larger option payloads are refused (and discarded)
MAX_DISCARD_OPTION = 16 * 1024 * 1024  # beyond this a client is treated as hostile
MAX_STRING = 4096
LARGE_PAYLOAD = 64 * 1024  # WRITE payloads from this size are gathered chunk-wise

# --- wire structs ---------------------------------------------------------
GREETING = struct.Struct(">QQH")
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")
OPTION_REPLY = struct.Struct(">QIII")
EXPORT_NAME_REPLY = struct.Struct(">QH")
REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
STRUCTURED_REPLY = struct.Struct(">IHHQI")
OFFSET_DATA_HEAD = struct.Struct(">IHHQIQ")  # structured header + offset
ERROR_CHUNK = struct.Struct(">IH")
U32 = struct.Struct(">I")
U16 = struct.Struct(">H")
U64 = struct.Struct(">Q")
INFO_EXPORT_S = struct.Struct(">HQH")
INFO_BLOCK_SIZE_S = struct.Struct(">HIII")
EXTENT = struct.Struct(">II")
assert GREETING.size == 18 and OPTION_HEADER.size == 16 and OPTION_REPLY.size == 20
assert REQUEST.size == 28 and SIMPLE_REPLY.size == 16 and STRUCTURED_REPLY.size == 20
assert OFFSET_DATA_HEAD.size == 28


def _utf8_prefix(text: str, limit: int) -> bytes:
    """``text`` encoded, cut to at most ``limit`` bytes without splitting a character."""
    raw = text.encode()
    if len(raw) <= limit:
        return raw
    return raw[:limit].decode("utf-8", "ignore").encode()


class NbdProtocolError(HvrError):
    """The peer broke the protocol in a way that leaves the stream unusable: close the connection."""

    code = "nbd_protocol"


class _Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA = _Sentinel.NEED_DATA


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the server says about one export."""

    name: str
    size: int
    read_only: bool = False
    description: str = ""
    multi_conn: bool = True
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = MAX_PAYLOAD

    @property
    def transmission_flags(self) -> int:
        flags = TF_HAS_FLAGS | TF_SEND_FLUSH
        if self.read_only:
            flags |= TF_READ_ONLY
        else:
            flags |= TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES
        if self.multi_conn:
            flags |= TF_CAN_MULTI_CONN
        return flags


class Request:
    """One transmission-phase request that passed validation."""

    __slots__ = ("cmd", "flags", "handle", "offset", "length", "data")

    def __init__(self, cmd: int, flags: int, handle: int, offset: int, length: int, data):
        self.cmd = cmd
        self.flags = flags
        self.handle = handle
        self.offset = offset
        self.length = length
        self.data = data

    def __repr__(self) -> str:
        return (f"Request(cmd={self.cmd}, flags={self.flags:#x}, handle={self.handle:#x}, "
                f"offset={self.offset}, length={self.length})")


@dataclass(frozen=True, slots=True)
class Negotiated:
    """Option haggling ended; the connection now serves ``export``."""

    export: ExportInfo
    structured_replies: bool
    meta_contexts: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Rejected:
    """A request was answered with an error by the protocol layer itself."""

    cmd: int
    handle: int
    offset: int
    length: int
    error: int
    message: str


@dataclass(frozen=True, slots=True)
class OptionHandled:
    """An option was answered during haggling (for logging)."""

    option: int
    reply: int
    message: str = ""


@dataclass(frozen=True, slots=True)
class Disconnect:
    """The client ended the session cleanly (NBD_OPT_ABORT or NBD_CMD_DISC)."""

    during: str


class Phase(enum.StrEnum):
    CLIENT_FLAGS = "client_flags"
    OPTIONS = "options"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


Lookup = Callable[[str], ExportInfo | None]
ListExports = Callable[[], Iterable[ExportInfo]]


class NbdServerConnection:
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
    def greeting(self) -> bytes:
        return GREETING.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)

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
                self._option_reply(option, reply, _utf8_prefix(msg, MAX_STRING))
                return OptionHandled(option, reply, msg)
            if kind == "request":
                self._reject(*args)
        return True

    def _client_flags(self):
        if len(self._buf) - self._pos < 4:
            return NEED_DATA
        (flags,) = CLIENT_FLAGS.unpack_from(self._buf, self._pos)
        self._pos += 4
        if flags & ~KNOWN_CLIENT_FLAGS:
            self.phase = Phase.CLOSED
            raise NbdProtocolError(f"client sent unknown handshake flags {flags:#x}")
        if not flags & FLAG_C_FIXED_NEWSTYLE:
            self.phase = Phase.CLOSED
            raise NbdProtocolError("client does not speak fixed newstyle negotiation")
        self.no_zeroes = bool(flags & FLAG_C_NO_ZEROES)
        self.phase = Phase.OPTIONS
        return self.next_event()

    # --- option haggling --------------------------------------------------
    def _option_reply(self, option: int, reply: int, data: bytes = b"") -> None:
        self._out += OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply, len(data))
        self._out += data

    def _option_error(self, option: int, reply: int, message: str) -> OptionHandled:
        self._option_reply(option, reply, _utf8_prefix(message, MAX_STRING))
        return OptionHandled(option, reply, message)

    def _next_option(self):
        avail = len(self._buf) - self._pos
        if avail < OPTION_HEADER.size:
            return NEED_DATA
        magic, option, length = OPTION_HEADER.unpack_from(self._buf, self._pos)
        if magic != IHAVEOPT:
            self.phase = Phase.CLOSED
            raise NbdProtocolError(f"bad option magic {magic:#x}")
        if length > MAX_OPTION_LENGTH:
            if option == Opt.EXPORT_NAME:  # it has no error reply: the session must end
                self.phase = Phase.CLOSED
                raise NbdProtocolError(f"NBD_OPT_EXPORT_NAME carries {length} bytes; export names are "
                                       f"at most {MAX_STRING}")
            if length > MAX_DISCARD_OPTION:
                self.phase = Phase.CLOSED
                raise NbdProtocolError(f"option {option} carries {length} bytes; refusing to read them")
            self._pos += OPTION_HEADER.size
            self._discard = length
            msg = f"option data of {length} bytes exceeds {MAX_OPTION_LENGTH}"
            self._discard_then = ("option", (option, REP_ERR_TOO_BIG, msg))
            done = self._drop_discard()
            return NEED_DATA if done is False else done
        if avail < OPTION_HEADER.size + length:
            return NEED_DATA
        start = self._pos + OPTION_HEADER.size
        data = bytes(self._buf[start:start + length])
        self._pos = start + length
        self._compact()
        return self._handle_option(option, data)

    def _handle_option(self, option: int, data: bytes):
        if option == Opt.ABORT:
            self._option_reply(option, REP_ACK)
            self.phase = Phase.CLOSED
            return Disconnect("options")
        if self._shutting_down():
            if option == Opt.EXPORT_NAME:
                self.phase = Phase.CLOSED
                raise NbdProtocolError("server is shutting down")
            return self._option_error(option, REP_ERR_SHUTDOWN, "server is shutting down")
        if option == Opt.EXPORT_NAME:
            return self._opt_export_name(data)
        if option == Opt.LIST:
            if data:
                return self._option_error(option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
            for info in self._list_exports():
                name = info.name.encode()
                self._option_reply(option, REP_SERVER, U32.pack(len(name)) + name + info.description.encode())
            self._option_reply(option, REP_ACK)
            return OptionHandled(option, REP_ACK)
        if option in (Opt.INFO, Opt.GO):
            return self._opt_info_go(option, data)
        if option == Opt.STRUCTURED_REPLY:
            if data:
                return self._option_error(option, REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
            self.structured_replies = True
            self._option_reply(option, REP_ACK)
            return OptionHandled(option, REP_ACK)
        if option in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            return self._opt_meta_context(option, data)
        name = Opt(option).name if option in Opt._value2member_map_ else str(option)
        return self._option_error(option, REP_ERR_UNSUP, f"option {name} is not supported")

    def _opt_export_name(self, data: bytes):
        try:
            name = self._decode_string(data)
        except ValueError as exc:
            self.phase = Phase.CLOSED
            raise NbdProtocolError(f"NBD_OPT_EXPORT_NAME: {exc}") from None
        info = self._lookup(name)
        if info is None:
            self.phase = Phase.CLOSED
            raise NbdProtocolError(f"NBD_OPT_EXPORT_NAME: no export named {name!r}")
        self._out += EXPORT_NAME_REPLY.pack(info.size, info.transmission_flags)
        if not self.no_zeroes:
            self._out += bytes(124)
        return self._enter_transmission(info)

    def _enter_transmission(self, info: ExportInfo) -> Negotiated:
        self.export = info
        self.meta_contexts = dict(self._meta_contexts) if self._meta_export == info.name else {}
        self.phase = Phase.TRANSMISSION
        return Negotiated(info, self.structured_replies, dict(self.meta_contexts))

    @staticmethod
    def _decode_string(raw: bytes) -> str:
        if len(raw) > MAX_STRING:
            raise ValueError(f"string of {len(raw)} bytes is longer than {MAX_STRING}")
        if b"\0" in raw:
            raise ValueError("string contains NUL")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("string is not UTF-8") from None

    def _opt_info_go(self, option: int, data: bytes):
        try:
            if len(data) < 4:
                raise ValueError("truncated export name length")
            (nlen,) = U32.unpack_from(data, 0)
            if len(data) < 4 + nlen + 2:
                raise ValueError("truncated export name or info request count")
            name = self._decode_string(data[4:4 + nlen])
            (count,) = U16.unpack_from(data, 4 + nlen)
            if len(data) != 4 + nlen + 2 + 2 * count:
                raise ValueError("info request list length does not match its count")
            requests = [U16.unpack_from(data, 6 + nlen + 2 * i)[0] for i in range(count)]
        except ValueError as exc:
            return self._option_error(option, REP_ERR_INVALID, f"malformed {Opt(option).name}: {exc}")
        info = self._lookup(name)
        if info is None:
            return self._option_error(option, REP_ERR_UNKNOWN, f"no export named {name!r}")
        self._option_reply(option, REP_INFO, INFO_EXPORT_S.pack(INFO_EXPORT, info.size, info.transmission_flags))
        for req in requests:
            if req == INFO_NAME:
                self._option_reply(option, REP_INFO, U16.pack(INFO_NAME) + info.name.encode())
            elif req == INFO_DESCRIPTION and info.description:
                self._option_reply(option, REP_INFO, U16.pack(INFO_DESCRIPTION) + info.description.encode())
            elif req == INFO_BLOCK_SIZE:
                self._option_reply(option, REP_INFO, INFO_BLOCK_SIZE_S.pack(
                    INFO_BLOCK_SIZE, info.min_block, info.preferred_block, info.max_block))
        self._option_reply(option, REP_ACK)
        if option == Opt.GO:
            return self._enter_transmission(info)
        return OptionHandled(option, REP_ACK)

    def _opt_meta_context(self, option: int, data: bytes):
        setting = option == Opt.SET_META_CONTEXT
        if setting:  # replaces all earlier contexts, even when it fails
            self._meta_export = None
            self._meta_contexts = {}
        if not self.structured_replies:
            return self._option_error(option, REP_ERR_INVALID, "meta contexts need structured replies first")
        try:
            if len(data) < 4:
                raise ValueError("truncated export name length")
            (nlen,) = U32.unpack_from(data, 0)
            pos = 4 + nlen
            if len(data) < pos + 4:
                raise ValueError("truncated export name or query count")
            name = self._decode_string(data[4:pos])
            (count,) = U32.unpack_from(data, pos)
            pos += 4
            queries = []
            for _ in range(count):
                if len(data) < pos + 4:
                    raise ValueError("truncated query length")
                (qlen,) = U32.unpack_from(data, pos)
                pos += 4
                if len(data) < pos + qlen:
                    raise ValueError("truncated query")
                queries.append(self._decode_string(data[pos:pos + qlen]))
                pos += qlen
            if pos != len(data):
                raise ValueError("trailing bytes after the queries")
        except ValueError as exc:
            return self._option_error(option, REP_ERR_INVALID, f"malformed {Opt(option).name}: {exc}")
        if self._lookup(name) is None:
            return self._option_error(option, REP_ERR_UNKNOWN, f"no export named {name!r}")
        selected = []
        if not queries and not setting:
            selected = [BASE_ALLOCATION]
        for q in queries:
            if q == BASE_ALLOCATION or (not setting and q == "base:"):
                if BASE_ALLOCATION not in selected:
                    selected.append(BASE_ALLOCATION)
        contexts = {}
        for ctx_id, ctx in enumerate(selected, start=1):
            contexts[ctx_id] = ctx
            self._option_reply(option, REP_META_CONTEXT, U32.pack(ctx_id if setting else 0) + ctx.encode())
        self._option_reply(option, REP_ACK)
        if setting:
            self._meta_export = name
            self._meta_contexts = contexts
        return OptionHandled(option, REP_ACK)

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
        msg = _utf8_prefix(message, MAX_STRING)
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
