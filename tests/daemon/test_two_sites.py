"""The two-site harness (``tests/support/two_sites.py``): either site's agent replicates to the other site.

Each direction on its own: a VM on one site, written through that agent's
NBD socket, replicated to the other site's listener through its counting
proxy, and ``qemu-img compare`` finds the replica equal to the primary.
"""

from __future__ import annotations

import pytest

from two_sites import MiB, TwoSites, images_equal


@pytest.fixture
def sites(tmp_path):
    with TwoSites(tmp_path, agent_config={"initial_window_bytes": 4 * MiB}) as two:
        yield two


@pytest.mark.parametrize("direction", ["a_to_b", "b_to_a"])
def test_each_site_replicates_to_the_other(sites, direction):
    primary = sites.a if direction == "a_to_b" else sites.b
    replica_site = primary.peer
    disk = primary.make_disk("sys", 16 * MiB)
    primary.add_vm("web", [disk], tracking="bitmap")
    primary.write("web", "sys", "write -P 0x11 0 1M", "write -P 0x22 9M 256k")
    primary.enable("web", frequency=300, extra=("--no-compression",))
    primary.initial("web")
    primary.write("web", "sys", "write -P 0x33 512k 64k", "write -P 0x44 15M 4k")
    sites.reset_counts()
    sites.sync(primary, "web")

    same, why = images_equal(disk, replica_site.replica_image("web", "sys"))
    assert same, why
    sent = sites.sent_bytes(primary)
    assert 68 * 1024 <= sent < 4 * MiB, f"the cycle of 68 KiB took {sent} bytes on the wire"
    assert sites.sent_bytes(replica_site) == 0, "nothing goes the other way"
    assert replica_site.agent.list_vms() == [], "the replica site's agent serves nothing"
