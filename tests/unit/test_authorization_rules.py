"""Authorization entries, the decision for a principal, and the trust-group rule (pure)."""

from __future__ import annotations

import pytest

from hvr_common.pure.authorization import (
    DEFAULT_TRUST_GROUP, AuthorizationEntry, Grant, authorize, check_same_trust_group, matching_entry,
)
from hvr_common.pure.errors import HvrError, UsageError
from hvr_common.pure.wire.error_catalogue import status_for

ENTRIES = [
    AuthorizationEntry("*.site1.example.com", "/srv/site1", "site1"),
    AuthorizationEntry("special.site1.example.com", "/srv/special", "special"),
    AuthorizationEntry("*.example.com", "/srv/example", "example"),
    AuthorizationEntry("host9", "/srv/host9", "site1"),
]


@pytest.mark.parametrize("principal, expected", [
    ("a.site1.example.com", ("site1", "/srv/site1", "*.site1.example.com")),
    ("A.SITE1.example.com", ("site1", "/srv/site1", "*.site1.example.com")),
    ("special.site1.example.com", ("special", "/srv/special", "special.site1.example.com")),  # exact wins
    ("site1.example.com", ("example", "/srv/example", "*.example.com")),
    ("b.example.com", ("example", "/srv/example", "*.example.com")),
    ("host9", ("site1", "/srv/host9", "host9")),
    ("x.a.site1.example.com", None),
    ("example.com", None),
    ("host9.example.org", None),
])
def test_entries_decide(principal, expected):
    if expected is None:
        with pytest.raises(HvrError) as info:
            authorize(principal, allow_any=False, default_storage="/d", entries=ENTRIES)
        assert info.value.code == "not_authorized" and status_for(info.value) == 403
        assert matching_entry(ENTRIES, principal) is None
    else:
        grant = authorize(principal, allow_any=False, default_storage="/d", entries=ENTRIES)
        assert (grant.trust_group, grant.storage, grant.entry) == expected and grant.principal == principal


@pytest.mark.parametrize("entries", [[], ENTRIES])
def test_allow_any_grants_the_default_storage_and_trust_group(entries):
    grant = authorize("special.site1.example.com", allow_any=True, default_storage="/d", entries=entries)
    assert grant == Grant("special.site1.example.com", DEFAULT_TRUST_GROUP, "/d", None)


def test_no_entries_and_not_allow_any_refuses_everyone():
    with pytest.raises(HvrError) as info:
        authorize("a.example.com", allow_any=False, default_storage="/d", entries=[])
    assert info.value.code == "not_authorized" and "hvrctl authz add" in info.value.hint


def test_entry_order_does_not_matter():
    for entries in (ENTRIES, ENTRIES[::-1]):
        assert matching_entry(entries, "special.site1.example.com").pattern == "special.site1.example.com"
        assert matching_entry(entries, "z.site1.example.com").pattern == "*.site1.example.com"


@pytest.mark.parametrize("replica_group, peer_group, refused", [
    ("site1", "site1", False),
    ("site1", "site2", True),
    ("DEFAULT", "DEFAULT", False),
    ("DEFAULT", "site1", True),
    ("site1", "SITE1", True),  # trust groups are compared exactly
])
def test_trust_group_rule(replica_group, peer_group, refused):
    grant = Grant("b.example.com", peer_group, "/x")
    if refused:
        with pytest.raises(HvrError) as info:
            check_same_trust_group("web1", replica_group, grant)
        assert info.value.code == "other_trust_group" and status_for(info.value) == 403
        assert f"'{replica_group}'" not in info.value.message  # the replica's group is not told to the peer
    else:
        check_same_trust_group("web1", replica_group, grant)


@pytest.mark.parametrize("pattern, storage, group, bad", [
    ("*.example.com", "/srv/r", "g1", None),
    ("Host1.Example.com", "/srv/r", "g-1.a_b", None),
    ("*.example.com\n", "/srv/r", "g1", "pattern"),
    ("web*.example.com", "/srv/r", "g1", "pattern"),
    ("*", "/srv/r", "g1", "pattern"),
    ("a/b", "/srv/r", "g1", "pattern"),
    ("", "/srv/r", "g1", "pattern"),
    (5, "/srv/r", "g1", "pattern"),
    ("h", "srv/r", "g1", "storage"),
    ("h", "/srv/../etc", "g1", "storage"),
    ("h", "/srv/r/", "g1", "storage"),
    ("h", "/srv//r", "g1", "storage"),
    ("h", "//srv/r", "g1", "storage"),
    ("h", "/srv/r\x00x", "g1", "storage"),
    ("h", "/srv/r\nx", "g1", "storage"),
    ("h", "/" + "a" * 2000, "g1", "storage"),
    ("h", None, "g1", "storage"),
    ("h", "/srv/r", "", "trust group"),
    ("h", "/srv/r", "g 1", "trust group"),
    ("h", "/srv/r", "g1\n", "trust group"),
    ("h", "/srv/r", "-g", "trust group"),
    ("h", "/srv/r", "g" * 65, "trust group"),
    ("h", "/srv/r", None, "trust group"),
])
def test_entries_are_validated(pattern, storage, group, bad):
    if bad is None:
        entry = AuthorizationEntry.of(pattern, storage, group)
        assert entry.pattern == pattern.lower() and entry.storage == storage and entry.trust_group == group
        return
    with pytest.raises(UsageError) as info:
        AuthorizationEntry.of(pattern, storage, group)
    assert bad in str(info.value)
