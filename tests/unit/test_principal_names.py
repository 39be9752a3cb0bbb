"""The principal of a certificate and the first-label wildcard rule (Hyper-V's allowed primary servers)."""

import pytest

from hvr_common.pure.errors import UsageError
from hvr_common.pure.principal_names import check_pattern, is_dns_name, name_matches, principal_of


@pytest.mark.parametrize("pattern, name, expected", [
    ("host1.example.com", "host1.example.com", True),
    ("HOST1.Example.com", "host1.example.COM", True),
    ("host1.example.com.", "host1.example.com", True),
    ("host1.example.com", "host2.example.com", False),
    ("host1.example.com", "host1.example.com.evil", False),
    ("*.example.com", "host1.example.com", True),
    ("*.example.com", "HOST1.EXAMPLE.COM", True),
    ("*.example.com", "example.com", False),
    ("*.example.com", "a.b.example.com", False),
    ("*.example.com", ".example.com", False),
    ("*.example.com", "host1.example.org", False),
    ("*.example.com", "host1example.com", False),
    ("host*.example.com", "host1.example.com", False),
    ("*.*.example.com", "a.b.example.com", False),
    ("a.*.example.com", "a.b.example.com", False),
    ("*", "host1", False),
    ("*.com", "example.com", True),
    ("host1", "host1", True),
    ("host1.example.com", "host1.example.com\n", False),
    ("*.example.com", "host/1.example.com", False),
    ("", "", False),
    ("host1@corp.example", "HOST1@corp.example", True),  # a token principal: exact names only
    ("*.example", "host1@corp.example", False),
    ("*.example.com", "a@b.example.com", False),
    ("*.example.com", "*.example.com", True),  # a wildcard certificate's principal, named as it is
    ("host 1", "host 1", False),
    ("host1\x00", "host1\x00", False),
    # Hyper-V's first-label rule, as the authorization entries use it
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
])
def test_name_matches(pattern, name, expected):
    assert name_matches(pattern, name) is expected


@pytest.mark.parametrize("name, expected", [
    ("host1", True), ("host-1.example.com", True), ("a" * 63, True), ("a" * 64, False),
    ("-host", False), ("host-", False), ("ho st", False), ("host\n", False), ("", False),
    (".".join(["a" * 49] * 5), True), (".".join(["a" * 50] * 5), False), (".".join(["a" * 50] * 6), False),
    ("hôst", False), (None, False),
])
def test_is_dns_name(name, expected):
    assert is_dns_name(name) is expected


@pytest.mark.parametrize("pattern", ["*.example.com", "host1.example.com", "Host1.Example.Com."])
def test_check_pattern_accepts(pattern):
    assert check_pattern(pattern) == pattern.lower().removesuffix(".")


@pytest.mark.parametrize("pattern", ["*", "host*.example.com", "a.*.example.com", "*.*.x", "", "../etc", "a b"])
def test_check_pattern_refuses(pattern):
    with pytest.raises(UsageError):
        check_pattern(pattern)


@pytest.mark.parametrize("dns, cn, expected", [
    (["host1.example.com", "other.example.com"], "ignored", "host1.example.com"),
    (["Host1.Example.com."], None, "host1.example.com"),
    ([], "host2.example.com", "host2.example.com"),
    (["not a name", "host3.example.com"], None, "host3.example.com"),
])
def test_principal_of(dns, cn, expected):
    assert principal_of(dns, cn) == expected


@pytest.mark.parametrize("dns, cn", [([], None), ([], "Not A Host"), (["bad name"], "host1.example.com")])
def test_principal_of_refuses_certificates_without_a_host_name(dns, cn):
    with pytest.raises(UsageError):
        principal_of(dns, cn)


def test_not_strings_never_match():
    assert name_matches(None, "a") is False and name_matches("a", None) is False
