"""Configuration: validated at start, every problem reported with its key."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from daemons import python_executable
from hvr_common.pure.config import parse_agent_config
from hvr_common.shell.config_file import read_toml
from hvr_common.pure.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
GOOD = {"state_dir": "/var/lib/hvr/agent", "admin_socket": "/run/hvr/agent.sock", "nbd_socket": "/run/hvr/nbd.sock"}


def test_sample_config_in_deploy_is_valid():
    cfg = parse_agent_config(read_toml(REPO / "deploy" / "agent.toml"))
    assert cfg.nbd_socket == Path("/run/hvr/nbd.sock")
    assert cfg.bitmap_region_bytes == 4 * 1024 * 1024
    assert cfg.http_listen == ("127.0.0.1", 9810)  # the probes: loopback in the sample


def test_the_agent_serves_no_http_probes_unless_configured():
    minimal = {"state_dir": "/var/lib/hvr", "admin_socket": "/run/hvr/agent.sock", "nbd_socket": "/run/hvr/nbd.sock"}
    assert parse_agent_config(minimal).http_listen is None


@pytest.mark.parametrize("bad, key", [
    ({"colour": "blue"}, "colour: unknown key"),
    ({"state_dir": "relative/dir"}, "state_dir: must be an absolute path"),
    ({"nbd_tcp": "127.0.0.1:99999"}, "nbd_tcp: port"),
    ({"nbd_tcp": "nohost"}, "nbd_tcp:"),
    ({"log_level": "loud"}, "log_level: must be one of"),
    ({"bitmap_region_bytes": 3000}, "bitmap_region_bytes: region size must be a power of two"),
    ({"journal_buffer_bytes": 0}, "journal_buffer_bytes: must be positive"),
    ({"journal_buffer_bytes": "1M"}, "journal_buffer_bytes: must be an integer"),
])
def test_bad_value_is_refused_naming_the_key(bad, key):
    with pytest.raises(ConfigError) as info:
        parse_agent_config({**GOOD, **bad})
    assert any(p.startswith(key) for p in info.value.problems), info.value.problems


def test_sample_config_has_freeze_hooks_for_libvirt():
    cfg = parse_agent_config(read_toml(REPO / "deploy" / "agent.toml"))
    hooks = cfg.app_consistency.hooks_for("web01")
    assert hooks.argv("freeze", "web01") == ["virsh", "domfsfreeze", "web01"]
    assert hooks.argv("thaw", "web01") == ["virsh", "domfsthaw", "web01"]


def test_per_vm_hooks_override_the_default():
    cfg = parse_agent_config({**GOOD, "app_consistency": {
        "freeze": ["f", "{vm}"], "thaw": ["t", "{vm}"],
        "vm": {"db01": {"freeze": ["q", "begin"], "thaw": ["q", "end"], "timeout_s": 5}}}})
    assert cfg.app_consistency.hooks_for("db01").argv("freeze", "db01") == ["q", "begin"]
    assert cfg.app_consistency.hooks_for("db01").timeout_s == 5
    assert cfg.app_consistency.hooks_for("web").argv("thaw", "web") == ["t", "web"]
    assert parse_agent_config(GOOD).app_consistency.hooks_for("web") is None


@pytest.mark.parametrize("section, key", [
    ({"freeze": ["f"]}, "app_consistency.thaw: must be a non-empty list"),
    ({"freeze": "virsh domfsfreeze", "thaw": ["t"]}, "app_consistency.freeze: must be a non-empty list"),
    ({"freeze": ["f"], "thaw": ["t"], "timeout_s": 0}, "app_consistency.timeout_s: must be whole seconds"),
    ({"freeze": ["f"], "thaw": ["t"], "colour": 1}, "app_consistency.colour: unknown key"),
    ({"vm": {"db": {"freeze": [], "thaw": ["t"]}}}, "app_consistency.vm.db.freeze: must be a non-empty list"),
    ({"vm": ["db"]}, "app_consistency.vm: must be a table"),
])
def test_bad_freeze_hooks_are_refused_naming_the_key(section, key):
    with pytest.raises(ConfigError) as info:
        parse_agent_config({**GOOD, "app_consistency": section})
    assert any(p.startswith(key) for p in info.value.problems), info.value.problems


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as info:
        parse_agent_config({"state_dir": 5, "extra": 1, "log_level": "x"})
    keys = sorted(p.split(":")[0] for p in info.value.problems)
    assert keys == ["admin_socket", "extra", "log_level", "nbd_socket", "state_dir"]


def _agent(*args, cwd=REPO):
    return subprocess.run([python_executable(), "-m", "hvr_agent", *map(str, args)], capture_output=True,
                          text=True, timeout=60, cwd=cwd)


def test_agent_refuses_to_start_with_unknown_key(tmp_path):
    cfg = tmp_path / "agent.toml"
    cfg.write_text('state_dir = "/tmp/x"\nadmin_socket = "/tmp/a.sock"\nnbd_socket = "/tmp/n.sock"\nbogus = 1\n')
    result = _agent("--config", cfg)
    assert result.returncode == 78
    assert "bogus: unknown key" in result.stderr


def test_agent_reports_unparsable_toml(tmp_path):
    cfg = tmp_path / "agent.toml"
    cfg.write_text('state_dir = "/tmp/x\n')
    result = _agent("--config", cfg)
    assert result.returncode == 78 and "not valid TOML" in result.stderr


def test_check_config_accepts_the_sample():
    result = _agent("--config", REPO / "deploy" / "agent.toml", "--check-config")
    assert result.returncode == 0, result.stderr
    assert "configuration is valid" in result.stdout


def test_check_config_creates_nothing(tmp_path):
    state = tmp_path / "state"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'state_dir = "{state}"\nadmin_socket = "{tmp_path}/a.sock"\nnbd_socket = "{tmp_path}/n.sock"\n')
    result = _agent("--config", cfg, "--check-config")
    assert result.returncode == 0, result.stderr
    assert not state.exists() and not (tmp_path / "a.sock").exists()


def test_sample_listener_config_in_deploy_is_valid():
    from hvr_common.pure.config import parse_listener_config
    cfg = parse_listener_config(read_toml(REPO / "deploy" / "listener.toml"))
    assert cfg.listen == ("0.0.0.0", 8443) and cfg.storage == Path("/var/lib/hvr/replicas")
    assert cfg.nbd_socket == Path("/run/hvr/listener-nbd.sock")
    assert cfg.http_listen == ("127.0.0.1", 9811)  # the probes: loopback in the sample


@pytest.mark.parametrize("bad, key", [
    ({"listen": "127.0.0.1"}, "listen:"),
    ({"storage": "rel"}, "storage: must be an absolute path"),
    ({"max_bundle_bytes": -1}, "max_bundle_bytes: must be positive"),
    ({"surprise": True}, "surprise: unknown key"),
    ({"nbd_socket": "listener-nbd.sock"}, "nbd_socket: must be an absolute path"),
])
def test_bad_listener_value_is_refused_naming_the_key(bad, key):
    from hvr_common.pure.config import parse_listener_config
    good = {"state_dir": "/s", "admin_socket": "/a.sock", "listen": "127.0.0.1:1", "storage": "/r"}
    with pytest.raises(ConfigError) as info:
        parse_listener_config({**good, **bad})
    assert any(p.startswith(key) for p in info.value.problems), info.value.problems


def test_nbd_socket_group_must_exist():
    with pytest.raises(ConfigError) as info:
        parse_agent_config({**GOOD, "nbd_socket_group": "no-such-group-hvr"})
    assert info.value.problems == ["nbd_socket_group: no group named 'no-such-group-hvr' on this host"]
    assert parse_agent_config({**GOOD, "nbd_socket_group": "root"}).nbd_socket_group == "root"


def test_sample_transfer_settings_in_deploy_are_valid():
    from hvr_common.pure.config import parse_listener_config
    cfg = parse_agent_config(read_toml(REPO / "deploy" / "agent.toml"))
    assert cfg.transfers.max_active_transfers == 3 and cfg.transfers.bandwidth.limit is None
    assert parse_listener_config(read_toml(REPO / "deploy" / "listener.toml")).max_active_applies == 1


@pytest.mark.parametrize("bad, key", [
    ({"max_active_transfers": 0}, "max_active_transfers: must be a whole number from 1 to 1024"),
    ({"bandwidth": {"limit": "fast"}}, "bandwidth.limit:"),
    ({"bandwidth": {"limit": "1MiB/s", "schedule": [{"start": "08:00", "end": "18:00"}]}},
     "bandwidth.schedule[0]: limit is required"),
    ({"bandwidth": "10MiB/s"}, "bandwidth: must be a table"),
])
def test_bad_transfer_settings_are_refused_naming_the_key(bad, key):
    with pytest.raises(ConfigError) as info:
        parse_agent_config({**GOOD, **bad})
    assert any(p.startswith(key) for p in info.value.problems), info.value.problems


def test_the_libvirt_sample_attaches_every_disk_through_the_agent_socket_with_reconnect():
    import xml.etree.ElementTree as ET
    cfg = parse_agent_config(read_toml(REPO / "deploy" / "agent.toml"))
    disks = ET.parse(REPO / "deploy" / "libvirt-domain.xml").getroot().findall("./devices/disk")
    assert disks
    for disk in disks:
        source = disk.find("source")
        assert source.get("protocol") == "nbd" and source.get("name").startswith("web01/")
        assert source.find("host").get("socket") == str(cfg.nbd_socket)
        assert int(source.find("reconnect").get("delay")) >= 30
        assert disk.find("driver").get("type") == "raw"


def test_the_failover_samples_name_the_hooks_and_a_domain_on_the_agent_socket():
    import xml.etree.ElementTree as ET
    cfg = parse_agent_config(read_toml(REPO / "deploy" / "agent.toml"))
    script = str(REPO / "deploy" / "libvirt" / "hvr-hooks.sh")
    assert {h: cfg.hooks.argv(h, {"name": "web01", "nbd_socket": "/run/hvr/nbd.sock"})[1:]
            for h in ("stop_vm", "define_vm", "start_vm", "undefine_vm")} == {
        "stop_vm": ["stop", "web01"], "define_vm": ["define", "web01", "/run/hvr/nbd.sock"],
        "start_vm": ["start", "web01"], "undefine_vm": ["undefine", "web01"]}
    assert subprocess.run(["sh", "-n", script], timeout=30).returncode == 0
    domain = ET.parse(REPO / "deploy" / "libvirt" / "domain.xml").getroot()
    assert domain.findtext("name") == "@NAME@"
    for disk in domain.findall("./devices/disk"):
        source = disk.find("source")
        assert source.get("protocol") == "nbd" and source.get("name").startswith("@NAME@/")
        assert source.find("host").get("transport") == "unix" and source.find("host").get("socket") == "@NBD_SOCKET@"
