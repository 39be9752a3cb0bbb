"""A full file system under the images (a real tmpfs, not a mock): writes fail, nothing breaks.

The guest gets ENOSPC; the log never gets a torn record in its middle; a cut
that cannot write fails cleanly and succeeds once space is back; and the
logs still replay to exactly the image.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from small_tmpfs import small_tmpfs
from daemons import AgentProcess, python_executable, run

MiB = 1024 * 1024
CLIENTS = Path(__file__).resolve().parents[1] / "support" / "clients"


@pytest.fixture
def small_fs(tmp_path):
    with small_tmpfs(tmp_path / "small", "40m") as mnt:
        yield mnt


def test_full_disk_gives_enospc_and_keeps_the_log_exact(small_fs, tmp_path):
    image = small_fs / "disk.img"
    with open(image, "wb") as fh:
        fh.truncate(32 * MiB)
    base = tmp_path / "disk.base"
    shutil.copyfile(image, base)
    filler = small_fs / "filler"
    with open(filler, "wb") as fh:
        fh.write(bytes(14 * MiB))  # leaves ~26 MiB: image data + log data cannot both fit
    agent = AgentProcess(tmp_path / "agent", extra_config={"bitmap_region_bytes": MiB})
    agent.start().wait_ready()
    try:
        agent.add_vm("full", [image], tracking="journal")  # the log on a full disk: journal mode's
        out = run(["/usr/bin/python3", str(CLIENTS / "fill_disk.py"), agent.nbd_uri("full", "disk"),
                   str(32 * MiB)], timeout_s=120).stdout
        result = json.loads(out.strip().splitlines()[-1])
        assert result["errors"], "the file system never filled up"
        assert any("No space left" in e or "ENOSPC" in e for e in result["errors"]), result["errors"]
        assert agent.is_alive()
        cut = agent.hvrctl("vm", "cut", "full", check=False)
        if cut.returncode != 0:  # no room for the END record or the next log: a clean refusal
            assert "cannot cut the logs of VM full" in cut.stderr, cut.stderr
        filler.unlink()
        agent.cut("full")  # with space back, the cut works
        agent.terminate()
        logs = sorted(small_fs.glob("disk.img.*.hrl"))
        for log in logs:
            run([python_executable(), "-m", "hvrctl", "hrl", "apply", str(log), str(base)], timeout_s=120)
        compare = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), str(base)],
                                 capture_output=True, text=True, timeout=120)
        assert compare.returncode == 0, compare.stdout + compare.stderr
    finally:
        agent.close()
