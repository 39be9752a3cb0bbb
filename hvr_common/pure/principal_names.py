"""How a primary's name is matched against a pattern: Hyper-V's rule.

A pattern is either a name, matched exactly, or ``*.`` followed by a name: a
wildcard that stands for exactly one whole label, the first one.  So
``*.example.com`` matches ``host1.example.com`` but neither ``example.com``
nor ``a.host1.example.com``; a ``*`` anywhere else, or inside a label
(``web*.example.com``), is no wildcard and matches no valid name.  Names
are compared without regard to case (DNS names), and a name that itself
holds a ``*`` never matches a wildcard.
"""

from __future__ import annotations

WILDCARD_LABEL = "*"


def name_matches(pattern: str, name: str) -> bool:
    """True if ``name`` is ``pattern`` (case-insensitive) or ``pattern`` is ``*.REST`` and ``name`` is ``LABEL.REST``."""
    if not isinstance(pattern, str) or not isinstance(name, str) or not pattern or not name:
        return False
    pattern, name = pattern.lower(), name.lower()
    if not pattern.startswith(WILDCARD_LABEL + "."):
        return pattern == name and WILDCARD_LABEL not in name
    rest = pattern[len(WILDCARD_LABEL) + 1:]
    first, dot, tail = name.partition(".")
    return (bool(dot) and bool(first) and bool(rest) and tail == rest
            and WILDCARD_LABEL not in name and WILDCARD_LABEL not in rest)


def is_wildcard(pattern: str) -> bool:
    return pattern.startswith(WILDCARD_LABEL + ".")
