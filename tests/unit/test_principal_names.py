"""Hyper-V's name rule: the exact name, or a wildcard standing for the whole first label only."""

from __future__ import annotations

import pytest

from hvr_common.pure.principal_names import name_matches

CASES = [
    # pattern, name, matches
    ("host1.example.com", "host1.example.com", True),
    ("host1.example.com", "HOST1.Example.COM", True),
    ("Host1.Example.com", "host1.example.com", True),
    ("host1.example.com", "host2.example.com", False),
    ("host1.example.com", "host1.example.com.evil", False),
    ("host1.example.com", "xhost1.example.com", False),
    ("*.example.com", "host1.example.com", True),
    ("*.example.com", "HOST1.EXAMPLE.COM", True),
    ("*.example.com", "example.com", False),
    ("*.example.com", "a.host1.example.com", False),
    ("*.example.com", ".example.com", False),
    ("*.example.com", "host1.example.org", False),
    ("*.example.com", "host1.example.com.", False),
    ("*.example.com", "*.example.com", False),
    ("*.example.com", "host1.evilexample.com", False),
    ("*.com", "example.com", True),
    ("*", "host1", False),
    ("*.", "host1.", False),
    ("web*.example.com", "web1.example.com", False),
    ("host1.*.com", "host1.example.com", False),
    ("*.*.example.com", "a.b.example.com", False),
    ("", "host1", False),
    ("host1", "", False),
    ("host1", "host1", True),
    ("host1", "host1\n", False),
]


@pytest.mark.parametrize("pattern, name, matches", CASES)
def test_name_matches(pattern, name, matches):
    assert name_matches(pattern, name) is matches


def test_not_strings_never_match():
    assert name_matches(None, "a") is False and name_matches("a", None) is False
