"""The pure input rules: numbers, JSON documents, names and storage locations (hvr_common.pure)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st

from hvr_agent.replica_client import _answer
from hvr_common.pure.errors import UsageError
from hvr_common.pure.input_limits import MAX_INT64, MAX_JSON_DEPTH, decimal, json_depth, json_object, quoted
from hvr_common.pure.names import check_name, is_export_name, is_name, storage_location_problem
from hvr_common.pure.token_auth import AuthError, check_principal
from hvr_common.pure.wire.error_catalogue import CATALOGUE, error_from_body


@pytest.mark.parametrize("raw", ["0", "1", "42", str(MAX_INT64), "0000000000000000001"])
def test_decimal_takes_ascii_digits_in_range(raw):
    assert decimal(raw, "n") == int(raw)


@pytest.mark.parametrize("raw", [None, "", "²", "١٢", "1\n", " 1", "+1", "-1", "1_0", "0x1", "1e3",
                                 str(MAX_INT64 + 1), "9" * 20, "9" * 5000, "½"])
def test_decimal_refuses_everything_else(raw):
    with pytest.raises(UsageError) as info:
        decimal(raw, "the number")
    assert "the number" in info.value.message and len(info.value.message) < 300


def test_decimal_bounds():
    with pytest.raises(UsageError):
        decimal("0", "n", minimum=1)
    with pytest.raises(UsageError):
        decimal("11", "n", maximum=10)


@given(st.text(max_size=40))
@settings(max_examples=300, deadline=None)
def test_decimal_never_fails_otherwise(raw):
    try:
        value = decimal(raw, "n")
    except UsageError:
        return
    assert raw.isascii() and raw.isdigit() and 0 <= value <= MAX_INT64


@pytest.mark.parametrize("raw", [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * (MAX_JSON_DEPTH + 1) + b"1" +
                                 b"}" * (MAX_JSON_DEPTH + 1), b'{"n": ' + b"9" * 10_000 + b"}", b"[1]", b"\xff",
                                 b"{", b'"x"', b"x" * 2_000_000])
def test_json_object_refuses_deep_huge_or_wrong_documents(raw):
    with pytest.raises(UsageError) as info:
        json_object(raw)
    assert len(info.value.message) < 300


def test_json_object_takes_a_document_at_the_depth_limit():
    raw = b'{"a":' * MAX_JSON_DEPTH + b"1" + b"}" * MAX_JSON_DEPTH
    assert json_depth(json_object(raw)) == MAX_JSON_DEPTH
    assert json_object(b"") == {}


def test_quoted_cuts_long_values():
    assert len(quoted("x" * 10_000)) < 100 and quoted("ab") == "'ab'"


@pytest.mark.parametrize("name", ["vm", "VM-1", "a.b_c", "0", "x" * 64])
def test_good_names(name):
    assert is_name(name)
    check_name("VM", name)


@pytest.mark.parametrize("name", ["", "vm\n", "vm\r", "\nvm", "..", ".", ".vm", "-vm", "_vm", "a/b", "a\\b",
                                  "vm\x00", "v m", "vé", "x" * 65, None, 1, ["vm"]])
def test_bad_names(name):
    assert not is_name(name)
    with pytest.raises(UsageError):
        check_name("VM", name)


def test_export_names():
    assert is_export_name("vm/d0")
    for bad in ("vm", "vm/", "/d0", "vm/d0/x", "vm/../d0", "vm\n/d0", "vm/d0\n", 3):
        assert not is_export_name(bad)


@pytest.mark.parametrize("principal", ["p\n", "p.example\n", "", "-p", "p p", "p/q", "p\x00"])
def test_principals_with_a_trailing_newline_or_odd_characters_are_refused(principal):
    with pytest.raises(AuthError):
        check_principal(principal)


def test_storage_locations():
    assert storage_location_problem("/srv/hvr/replicas") is None
    for bad in ("srv", "", "/srv/../etc", "/srv/..", "/srv\n", "/srv/\x00", "/" + "a" * 5000, None, 5):
        assert storage_location_problem(bad) is not None


def test_a_full_replica_disk_is_retried_by_the_agent():
    entry = CATALOGUE["storage_full"]
    assert entry.status == 507 and entry.transient
    body = {"code": "storage_full", "message": "no space left", "hint": "free space"}
    assert error_from_body(507, body).transient
    with pytest.raises(Exception) as info:
        _answer(507, json.dumps(body).encode(), "PUT cycle")
    assert getattr(info.value, "transient", False) and info.value.code == "storage_full"


def test_the_agent_survives_a_hostile_answer():
    with pytest.raises(Exception) as info:
        _answer(400, b"[" * 100_000 + b"]" * 100_000, "PUT replica")
    assert not isinstance(info.value, RecursionError)


@pytest.mark.parametrize("storage", ["/srv/x\x00y", "/srv/../etc", "/srv/x\n"])
def test_a_config_path_with_nul_a_line_break_or_dotdot_is_a_config_error(storage):
    from hvr_common.pure.config import parse_listener_config
    from hvr_common.pure.errors import ConfigError
    with pytest.raises(ConfigError) as info:
        parse_listener_config({"state_dir": "/var/lib/hvr", "storage": storage})
    assert any(p.startswith("storage:") for p in info.value.problems), info.value.problems


def test_replica_server_hosts():
    from hvr_common.pure.names import is_host
    for good in ("127.0.0.1", "::1", "replica.example", "replica-1.example.", "localhost", "a" * 63 + ".example"):
        assert is_host(good), good
    for bad in ("", "127.0.0.1\n", "replica.example\n", "a b", "a/b", "-a.example", "a..b", "x" * 254, "a\x00",
                "a" * 64 + ".example", "http://x", None, 5):
        assert not is_host(bad), bad


def test_an_error_code_with_a_trailing_newline_is_not_taken_from_an_answer():
    err = error_from_body(409, {"code": "out_of_order\n", "message": "x"})
    assert err.code != "out_of_order\n"


def test_the_agent_looks_up_only_export_names_of_the_rule():
    from hvr_agent.exports import VmExports

    class Registry:
        asked: list = []

        def export(self, name):
            self.asked.append(name)
            return None

    registry = Registry()
    exports = VmExports(registry)
    for name in ("vm1/../d0", "vm1/d0\n", "../etc/passwd", "vm1/d0/x", "vm1/d0\x00", "", "x" * 10_000):
        assert exports.lookup(name) is None
    assert registry.asked == []
    assert exports.lookup("vm1/d0") is None and registry.asked == ["vm1/d0"]


# --- text numbers of settings: ASCII digits, the whole string --------------------------------------
# str.isdigit() takes '²' (which int() refuses: a 500) and '١٢' (which int() reads: a wrong value accepted)

@pytest.mark.parametrize("text", ["²²:00", "١٠:٠٠", "10:00\n", "1०:00", " 9:00", "09:00 "])
def test_a_monitoring_start_with_odd_digits_is_a_usage_error(text):
    from hvr_common.pure.monitoring import parse_start
    with pytest.raises(UsageError):
        parse_start(text)


@pytest.mark.parametrize("text", ["²:00", "١٠:٠٠", "10:00\n", "1०:00"])
def test_a_time_of_day_with_odd_digits_is_refused(text):
    from hvr_common.pure.bandwidth import parse_time_of_day
    from hvr_common.pure.resync_window import parse_window
    with pytest.raises(ValueError):
        parse_time_of_day(text)
    if text.strip() == text:  # a window's surrounding blanks are stripped on purpose
        with pytest.raises(ValueError):
            parse_window(f"{text}-23:00")


@pytest.mark.parametrize("port", ["²", "٢٨٧١١", "1_0", "+80", "9" * 5000])
def test_a_listen_port_with_odd_digits_is_a_config_error(port):
    from hvr_common.pure.config import parse_listener_config
    from hvr_common.pure.errors import ConfigError
    with pytest.raises(ConfigError) as info:
        parse_listener_config({"state_dir": "/var/lib/hvr", "listen": f"127.0.0.1:{port}"})
    assert any(p.startswith("listen:") and len(p) < 300 for p in info.value.problems), info.value.problems


@pytest.mark.parametrize("rate", ["9" * 400 + "MiB/s", "١٠MiB/s", "10MiB/s\nx", 2 ** 80, "2TiB/s", "2048GiB/s",
                                  "1" * 20 + "B/s"])
def test_a_bandwidth_rate_with_odd_digits_or_beyond_any_link_is_refused(rate):
    from hvr_common.pure.bandwidth import parse_rate
    with pytest.raises(ValueError) as info:
        parse_rate(rate)
    assert len(str(info.value)) < 400


def test_a_log_file_name_with_non_ascii_digits_is_not_a_log(tmp_path):
    from hvr_agent.journal import parse_log_sequence
    image = tmp_path / "disk.img"
    assert parse_log_sequence(image, tmp_path / "disk.img.0000000042.hrl") == 42
    for odd in ("²" * 10, "١" * 10, "000000004²"):
        assert parse_log_sequence(image, tmp_path / f"disk.img.{odd}.hrl") is None
