"""The rule for every name or location that can reach a path or a URL: VMs, disks, exports, storage, hosts.

A VM or disk name is one to 64 letters, digits, ``.``, ``_`` or ``-``,
starting with a letter or digit: never ``..``, a ``/``, a NUL, a space or a
line break (the whole string is matched, so a trailing newline is refused).
The agent checks it when a VM is added; the listener checks it again on
every enable request, since a name becomes a folder and a file name on the
replica host.  An export name is ``VM/DISK``, both names of that rule.  A
storage location is an absolute path without ``..`` components, NUL or
control characters, of at most :data:`MAX_PATH_CHARS` characters (config
paths, key files and image paths follow the same rule).  A replica server is
an IP address or a DNS name.
"""

from __future__ import annotations

import ipaddress
import re

from hvr_common.pure.errors import UsageError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")  # \Z, not $: "vm\n" is not a name
NAME_RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
MAX_PATH_CHARS = 4096


def is_name(value: object) -> bool:
    return isinstance(value, str) and NAME_RE.fullmatch(value) is not None


def check_name(kind: str, name: str) -> None:
    """Refuse a VM or disk name (``kind``) that breaks the rule."""
    if not is_name(name):
        raise UsageError(f"{kind} name {name!r:.80} is not valid", hint=f"use {NAME_RULE}")


def is_export_name(value: object) -> bool:
    """``VM/DISK``, both of the name rule."""
    if not isinstance(value, str):
        return False
    vm, sep, disk = value.partition("/")
    return bool(sep) and is_name(vm) and is_name(disk)


_HOST_LABEL_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")


def is_host(value: object) -> bool:
    """A replica server's address: an IP address, or a DNS name (labels of letters, digits and '-')."""
    if not isinstance(value, str) or not value or len(value) > 253:
        return False
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        pass
    return all(_HOST_LABEL_RE.match(label) for label in value.removesuffix(".").split("."))


def storage_location_problem(value: object) -> str | None:
    """Why ``value`` cannot be a storage location (a folder replicas are created in), or None."""
    if not isinstance(value, str):
        return "must be a string"
    if not value.startswith("/"):
        return "must be an absolute path"
    if len(value) > MAX_PATH_CHARS:
        return f"must be at most {MAX_PATH_CHARS} characters"
    if any(ord(c) < 0x20 or c == "\x7f" for c in value):
        return "must not contain NUL, line breaks or other control characters"
    if ".." in value.split("/"):
        return "must not contain '..' components"
    return None


def check_storage_location(what: str, value: object) -> str:
    problem = storage_location_problem(value)
    if problem is not None:
        raise UsageError(f"{what} {problem}, not {value!r}"[:300])
    return value
