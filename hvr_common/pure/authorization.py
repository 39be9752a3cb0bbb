"""Which authenticated primaries may replicate here, where their replicas go, and their trust group.

Set-VMReplicationServer -ReplicationAllowedFromAnyServer and the
``*-VMReplicationAuthorizationEntry`` cmdlets, as pure rules:

* **Allow any authenticated server** (``allow_any_authenticated``): every
  authenticated primary is granted the default storage location and the trust
  group ``DEFAULT``; authorization entries are not consulted.
* Otherwise only **authorization entries** grant: {allowed primary pattern,
  storage location, trust group}.  The pattern is a principal name or
  ``*.`` plus a name (:func:`hvr_common.pure.principal_names.name_matches`).
  When several entries match, an exact name wins over a wildcard, and a
  longer wildcard over a shorter one.  A primary no entry matches is refused
  (403 ``not_authorized``).

A replica records the trust group of the primary that created it.  A
request for it from a primary of another group is refused (403
``other_trust_group``); a primary of the same group is accepted (the VM
moved to another primary host of the same organisation).

Pure: the entries and settings are passed in.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass

from hvr_common.pure.errors import UsageError
from hvr_common.pure.principal_names import is_wildcard, name_matches
from hvr_common.pure.wire.error_catalogue import error

DEFAULT_TRUST_GROUP = "DEFAULT"
TRUST_GROUP_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
TRUST_GROUP_RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,254}")  # a principal (token_auth.PRINCIPAL_RE)
MAX_STORAGE_CHARS = 1024


@dataclass(frozen=True, slots=True)
class AuthorizationEntry:
    pattern: str  # "host1.example.com" or "*.example.com"
    storage: str  # absolute folder; replicas go to per-VM-id folders below it
    trust_group: str

    def to_json(self) -> dict:
        return {"pattern": self.pattern, "storage": self.storage, "trust_group": self.trust_group}

    @staticmethod
    def of(pattern: object, storage: object, trust_group: object) -> AuthorizationEntry:
        """A checked entry, or a 400 naming the bad field."""
        return AuthorizationEntry(check_pattern(pattern), check_storage(storage), check_trust_group(trust_group))


@dataclass(frozen=True, slots=True)
class Grant:
    """What an authenticated primary is allowed: its trust group and where its new replicas go."""

    principal: str
    trust_group: str
    storage: str
    entry: str | None = None  # the pattern of the entry that granted it; None: allow any authenticated


def check_pattern(pattern: object) -> str:
    if not isinstance(pattern, str):
        raise UsageError("field 'pattern' must be a string")
    name = pattern[2:] if is_wildcard(pattern) else pattern
    if _NAME_RE.fullmatch(name) is None:
        raise UsageError(f"allowed primary pattern {pattern!r} is not valid",
                         hint="use a primary's name (host1.example.com) or a wildcard in the first label only "
                              "(*.example.com)")
    return pattern.lower()


def check_storage(storage: object) -> str:
    if not isinstance(storage, str):
        raise UsageError("field 'storage' must be a string")
    if (not storage.startswith("/") or len(storage) > MAX_STORAGE_CHARS
            or any(c == "\x00" or ord(c) < 0x20 or c == "\x7f" for c in storage)
            or posixpath.normpath(storage) != storage or storage.startswith("//")):
        raise UsageError(f"storage location {storage!r} is not valid",
                         hint="use an absolute, normalised path without '..', control characters or a "
                              "trailing '/'")
    return storage


def check_trust_group(trust_group: object) -> str:
    if not isinstance(trust_group, str) or TRUST_GROUP_RE.fullmatch(trust_group) is None:
        raise UsageError(f"trust group {trust_group!r} is not valid", hint=f"use {TRUST_GROUP_RULE}")
    return trust_group


def matching_entry(entries: Iterable[AuthorizationEntry], principal: str) -> AuthorizationEntry | None:
    """The entry that decides for ``principal``: an exact name first, then the longest wildcard."""
    best: AuthorizationEntry | None = None
    for entry in entries:
        if not name_matches(entry.pattern, principal):
            continue
        rank = (not is_wildcard(entry.pattern), len(entry.pattern))
        if best is None or rank > (not is_wildcard(best.pattern), len(best.pattern)):
            best = entry
    return best


def authorize(principal: str, *, allow_any: bool, default_storage: str,
              entries: Iterable[AuthorizationEntry]) -> Grant:
    """The grant of an authenticated ``principal``, or 403 ``not_authorized``."""
    if allow_any:
        return Grant(principal, DEFAULT_TRUST_GROUP, default_storage)
    entry = matching_entry(entries, principal)
    if entry is None:
        raise error("not_authorized", f"{principal!r} is authenticated but not authorised on this server",
                    hint="on the replica server: hvrctl authz add PATTERN --storage PATH --trust-group NAME, "
                         "or hvrctl server set --allow-any true")
    return Grant(principal, entry.trust_group, entry.storage, entry.pattern)


def check_same_trust_group(replica_name: str, replica_group: str, grant: Grant) -> None:
    """403 ``other_trust_group`` unless ``grant`` is of the trust group that created the replica."""
    if grant.trust_group != replica_group:
        raise error("other_trust_group",
                    f"VM {replica_name} was first replicated by a primary of another trust group; "
                    f"{grant.principal!r} (trust group {grant.trust_group!r}) may not change it",
                    hint="a VM may move only between primaries of the same trust group",
                    detail={"principal": grant.principal, "trust_group": grant.trust_group})
