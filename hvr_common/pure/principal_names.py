"""Principals of certificates and the rule that matches them against a pattern.

A primary authenticated by certificate is named by the first DNS name of its
certificate's subjectAltName, or by its subject's common name (CN) when the
certificate has no DNS name.  Names are compared case-insensitively and
without a trailing dot, as DNS names are.

A pattern matches a name as Hyper-V Replica matches its allowed primary
servers: the exact name, or ``*`` standing for the whole first label only
(``*.example.com`` matches ``a.example.com``, not ``example.com`` nor
``a.b.example.com``).  Used for certificate host names and for
authorization entries alike.
"""

from __future__ import annotations

import re

from hvr_common.pure.errors import UsageError

_LABEL_RE = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?", re.ASCII)
MAX_NAME_CHARS = 253


def normalize(name: str) -> str:
    """The comparable form of a DNS name: lower case, no trailing dot."""
    return name.lower().removesuffix(".")


def is_dns_name(name: object) -> bool:
    """A host name of ASCII labels (letters, digits, ``-``, ``_``), at most 253 characters."""
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_CHARS:
        return False
    return all(_LABEL_RE.fullmatch(label) for label in normalize(name).split("."))


def check_pattern(pattern: str) -> str:
    """Refuse a pattern that is neither a DNS name nor ``*.`` followed by one; return it normalized."""
    rest = pattern[2:] if isinstance(pattern, str) and pattern.startswith("*.") else pattern
    if not is_dns_name(rest):
        raise UsageError(f"{pattern!r} is not a host name pattern",
                         hint="use an exact host name, or a wildcard in the first label only (*.example.com)")
    return normalize(pattern)


def name_matches(pattern: str, name: str) -> bool:
    """True when ``name`` is ``pattern``, or ``pattern`` is ``*.REST`` and ``name`` is ``LABEL.REST``.

    Any principal (a token's may hold ``@`` or ``_``) matches its exact
    pattern; only a host name (a DNS label, then ``REST``) matches a wildcard.
    """
    if not isinstance(pattern, str) or not isinstance(name, str) or not pattern or not name:
        return False
    p, n = normalize(pattern), normalize(name)
    if not n.isprintable() or any(c.isspace() for c in n):
        return False
    if p.startswith("*.") and p != n:
        first, sep, rest = n.partition(".")
        return bool(sep) and is_dns_name(first) and rest == p[2:] and is_dns_name(rest)
    return p == n


def principal_of(dns_names: list[str], common_name: str | None) -> str:
    """The principal a certificate names: its first SAN DNS name, else its CN.

    Raises :class:`UsageError` when it names none that is a host name.
    """
    for name in dns_names:
        if is_dns_name(name) or (name.startswith("*.") and is_dns_name(name[2:])):
            return normalize(name)
    if not dns_names and common_name and is_dns_name(common_name):
        return normalize(common_name)
    raise UsageError("the certificate names no host (no DNS name in its subjectAltName, no host name as CN)",
                     hint="issue the certificate with the host's name as subjectAltName DNS entry")


def is_wildcard(pattern: str) -> bool:
    """True for a first-label wildcard pattern (``*.REST``)."""
    return pattern.startswith("*.")
