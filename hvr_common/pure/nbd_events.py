"""What the NBD protocol core hands its shell: events, the export description, the protocol error.

:class:`~hvr_common.pure.nbd_protocol.NbdServerConnection` answers
:data:`NEED_DATA` or one of these events; :class:`ExportInfo` is what the
shell's ``lookup``/``list_exports`` callables say about an export.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from hvr_common.pure.errors import HvrError
from hvr_common.pure.nbd_wire import (
    MAX_PAYLOAD, TF_CAN_MULTI_CONN, TF_HAS_FLAGS, TF_READ_ONLY, TF_SEND_FLUSH, TF_SEND_FUA, TF_SEND_TRIM,
    TF_SEND_WRITE_ZEROES,
)


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
