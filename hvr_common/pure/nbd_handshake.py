"""The NBD handshake, server side: greeting, client flags and option haggling (sans-I/O).

Only the fixed-newstyle handshake is spoken.  Option haggling is answered
entirely here (the ``lookup``/``list_exports`` callables give the export
information); once an export is chosen a ``Negotiated`` event is emitted and
the connection is in the transmission phase.
"""

from __future__ import annotations

from hvr_common.pure.nbd_events import (
    NEED_DATA, Disconnect, ExportInfo, NbdProtocolError, Negotiated, OptionHandled, Phase,
)
from hvr_common.pure.nbd_wire import (
    BASE_ALLOCATION, CLIENT_FLAGS, EXPORT_NAME_REPLY, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES,
    FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, GREETING, IHAVEOPT, INFO_BLOCK_SIZE, INFO_BLOCK_SIZE_S,
    INFO_DESCRIPTION, INFO_EXPORT, INFO_EXPORT_S, INFO_NAME, KNOWN_CLIENT_FLAGS, MAX_STRING, NBDMAGIC,
    OPTION_HEADER, OPTION_REPLY, OPTION_REPLY_MAGIC, REP_ACK, REP_ERR_INVALID, REP_ERR_SHUTDOWN,
    REP_ERR_TOO_BIG, REP_ERR_UNKNOWN, REP_ERR_UNSUP, REP_INFO, REP_META_CONTEXT, REP_SERVER, U16, U32, Opt,
    utf8_prefix,
)

MAX_OPTION_LENGTH = 64 * 1024  # larger option payloads are refused (and discarded)
MAX_DISCARD_OPTION = 16 * 1024 * 1024  # beyond this a client is treated as hostile


class NbdHandshake:
    """The handshake half of :class:`~hvr_common.pure.nbd_protocol.NbdServerConnection`.

    It works on the connection's state (set up by ``NbdServerConnection.__init__``)
    and ends by entering the transmission phase.
    """

    def greeting(self) -> bytes:
        return GREETING.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)

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
        self._option_reply(option, reply, utf8_prefix(message, MAX_STRING))
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
