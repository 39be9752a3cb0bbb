"""The rule for the names an operator gives: VMs and disks.

One to 64 letters, digits, ``.``, ``_`` or ``-``, starting with a letter or
digit.  The agent checks it when a VM is added; the listener checks it again
on every enable request, since a name becomes a folder and a file name on the
replica host.
"""

from __future__ import annotations

import re

from hvr_common.pure.errors import UsageError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
NAME_RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"


def is_name(value: object) -> bool:
    return isinstance(value, str) and NAME_RE.match(value) is not None


def check_name(kind: str, name: str) -> None:
    """Refuse a VM or disk name (``kind``) that breaks the rule."""
    if not is_name(name):
        raise UsageError(f"{kind} name {name!r} is not valid", hint=f"use {NAME_RULE}")
