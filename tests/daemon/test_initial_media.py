"""Initial replication from external media: export on the primary, import on the replica server.

Real agent and listener on loopback; qemu-io writes through the agent while
the media is exported and while it "travels"; ``qemu-img compare`` checks
the replica against the primary once the cycles after the export point are
applied.  Tampered media and media of another VM are refused with nothing
changed; an import killed half-way is finished by the same import again.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import threading
from pathlib import Path

import pytest

from daemons import wait_for
from replication_pair import MiB, Pair, make_disk, qemu_io

from hvrctl.client import AdminClient


@pytest.fixture
def pair(tmp_path):
    p = Pair(tmp_path).start()
    yield p
    p.close()


def random_writes(uri: str, rng: random.Random, size: int, count: int, length: int = 65536) -> None:
    cmds = []
    for _ in range(count):
        off = rng.randrange(0, size - length) // 512 * 512
        cmds.append(f"write -z {off} {length}" if rng.random() < 0.1 else f"write -P {rng.randrange(1, 256)} {off} {length}")
    qemu_io(uri, *cmds)


class Writer(threading.Thread):
    """Keeps writing through the agent until stopped; counts its rounds."""

    def __init__(self, uri: str, size: int, seed: int):
        super().__init__(daemon=True)
        self.uri, self.size, self.rng = uri, size, random.Random(seed)
        self.stop = threading.Event()
        self.rounds = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                random_writes(self.uri, self.rng, self.size, 20)
                self.rounds += 1
        except BaseException as exc:  # reported by the test
            self.error = exc

    def finish(self) -> int:
        self.stop.set()
        self.join(120)
        assert self.error is None, self.error
        return self.rounds


def export(pair: Pair, vm: str, directory: Path, *, chunk: int = MiB) -> dict:
    return pair.agent.hvrctl_json("initial", "export", vm, directory, "--chunk-size", str(chunk), "-o", "json",
                                  timeout_s=300)


def import_media(pair: Pair, vm: str, directory: Path, check: bool = True):
    return pair.listener.hvrctl("initial", "import", vm, directory, "-o", "json", check=check, timeout_s=300)


def wait_replicating(pair: Pair, vm: str) -> None:
    wait_for(lambda: pair.status(vm)["state"] == "Replicating", 120, f"{vm} to replicate after the import",
             interval_s=0.2, context=lambda: pair.agent.log_tail() + pair.listener.log_tail())


def converge(pair: Pair, vm: str, disks: list[Path]) -> None:
    wait_replicating(pair, vm)
    pair.sync(vm)
    pair.wait_replica_applied(vm)
    pair.assert_identical(vm, disks)


def replica_fingerprint(pair: Pair, vm: str, disks: list[Path]) -> tuple:
    rep = pair.replica(vm)
    images = tuple(hashlib.sha256(pair.replica_image(vm, d.stem).read_bytes()).hexdigest() for d in disks)
    return rep["state"], tuple(d["initial_offset"] for d in rep["disks"]), images


def test_export_and_import_with_writes_during_export_and_transport(pair, tmp_path):
    size = 48 * MiB
    disks = [make_disk(tmp_path / "sys.img", size), make_disk(tmp_path / "data.img", size)]
    pair.protect("web", disks)
    rng = random.Random(13)
    for d in disks:  # data the media must carry
        random_writes(pair.agent.nbd_uri("web", d.stem), rng, size, 200, length=256 * 1024)
    writers = [Writer(pair.agent.nbd_uri("web", d.stem), size, seed=i) for i, d in enumerate(disks)]
    for w in writers:
        w.start()
    wait_for(lambda: all(w.rounds for w in writers) or any(w.error for w in writers), 60, "writes to begin")
    media = tmp_path / "media"
    result = export(pair, "web", media)
    assert sum(w.finish() for w in writers) >= 2
    assert result["base_sequence"] >= 0 and result["data_bytes"] > 0
    manifest = json.loads((media / "manifest.json").read_text())
    assert manifest["vm_id"] == pair.status("web")["vm_id"] and manifest["vm_name"] == "web"
    assert {d["name"] for d in manifest["disks"]} == {"sys", "data"}
    assert pair.status("web")["state"] == "WaitingForInitialReplication"
    assert pair.replica("web")["state"] == "WaitingForInitialReplication"
    for d in disks:  # while the media travels
        random_writes(pair.agent.nbd_uri("web", d.stem), rng, size, 60)
    imported = json.loads(import_media(pair, "web", media).stdout)
    assert imported["manifest_blake3"] == result["manifest_blake3"]
    converge(pair, "web", disks)
    for d in disks:  # and it keeps replicating
        random_writes(pair.agent.nbd_uri("web", d.stem), rng, size, 30)
    pair.sync("web")
    pair.wait_replica_applied("web")
    pair.assert_identical("web", disks)
    again = pair.agent.hvrctl("initial", "export", "web", tmp_path / "again", "-o", "json", check=False)
    assert again.returncode == 4 and json.loads(again.stderr)["error"]["code"] == "wrong_state"
    assert not (tmp_path / "again").exists()


def _flip_chunk(media: Path) -> None:
    chunk = sorted(media.glob("*/*.chunk"))[0]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))


def _change_manifest(media: Path) -> None:
    doc = json.loads((media / "manifest.json").read_text())
    doc["base_sequence"] += 1  # an older point would lose writes: the digest must catch it
    (media / "manifest.json").write_text(json.dumps(doc))


def _drop_manifest(media: Path) -> None:
    (media / "manifest.json").unlink()  # what an interrupted export leaves


@pytest.mark.parametrize("tamper,code,exit_code", [(_flip_chunk, "media_corrupt", 65),
                                                   (_change_manifest, "media_corrupt", 65),
                                                   (_drop_manifest, "bad_request", 2),
                                                   (None, "media_wrong_vm", 4)],
                         ids=["changed chunk", "changed manifest", "no manifest", "another VM"])
def test_tampered_or_foreign_media_is_refused_and_nothing_changes(pair, tmp_path, tamper, code, exit_code):
    size = 8 * MiB
    disks = [make_disk(tmp_path / "sys.img", size)]
    pair.protect("web", disks)
    rng = random.Random(5)
    random_writes(pair.agent.nbd_uri("web", "sys"), rng, size, 40)
    media = tmp_path / "media"
    export(pair, "web", media)
    bad = tmp_path / "bad"
    if tamper is None:  # media of another VM, with a disk of the same name and size
        (tmp_path / "other").mkdir()
        other = [make_disk(tmp_path / "other" / "sys.img", size)]
        pair.protect("other", other)
        random_writes(pair.agent.nbd_uri("other", "sys"), rng, size, 10)
        export(pair, "other", bad)
    else:
        shutil.copytree(media, bad)
        tamper(bad)
    before = replica_fingerprint(pair, "web", disks)
    assert before[0] == "WaitingForInitialReplication"
    refused = import_media(pair, "web", bad, check=False)
    assert refused.returncode == exit_code, refused.stdout + refused.stderr
    assert json.loads(refused.stderr)["error"]["code"] == code
    assert replica_fingerprint(pair, "web", disks) == before
    assert pair.status("web")["state"] == "WaitingForInitialReplication"
    import_media(pair, "web", media)  # the untouched media still goes in
    converge(pair, "web", disks)


def test_import_killed_half_way_is_finished_by_importing_again(pair, tmp_path):
    size = 256 * MiB
    disks = [make_disk(tmp_path / "sys.img", size)]
    pair.protect("web", disks)
    qemu_io(pair.agent.nbd_uri("web", "sys"), "write -P 0x5a 0 200M", timeout_s=300)
    media = tmp_path / "media"
    export(pair, "web", media, chunk=4 * MiB)
    random_writes(pair.agent.nbd_uri("web", "sys"), random.Random(3), size, 50)

    class Killed(Exception):
        pass

    def on_progress(p: dict) -> None:
        if p["phase"] == "load" and 0 < p["done_bytes"] < p["total_bytes"]:
            pair.listener.kill()
            raise Killed()

    client = AdminClient(pair.listener.admin_socket, "hvr-listener", timeout_s=300)
    with pytest.raises(Killed):
        client.stream("POST", "/v1/replicas/web/initial/import", {"directory": str(media)}, on_progress)
    pair.listener.start().wait_ready()
    rep = pair.replica("web")
    assert rep["state"] == "WaitingForInitialReplication"  # killed before the commit point
    assert all(d["initial_offset"] == 0 for d in rep["disks"])
    import_media(pair, "web", media)
    converge(pair, "web", disks)


def test_media_of_an_earlier_export_is_not_completed_until_the_right_media_is_imported(pair, tmp_path):
    size = 8 * MiB
    disks = [make_disk(tmp_path / "sys.img", size)]
    pair.protect("web", disks)
    rng = random.Random(9)
    random_writes(pair.agent.nbd_uri("web", "sys"), rng, size, 40)
    old = tmp_path / "old"
    first = export(pair, "web", old)
    # replication removed and enabled again: a new export point, the old media on the shelf
    pair.agent.hvrctl("vm", "remove", "web", "--replication-only")
    pair.listener.hvrctl("replica", "remove", "web", "--delete-storage")
    random_writes(pair.agent.nbd_uri("web", "sys"), rng, size, 40)  # in logs the old media lacks
    pair.agent.hvrctl("vm", "enable", "web", "--replica-server", "127.0.0.1", "--port", str(pair.replica_port),
                      "--key", str(pair.key_path), "--frequency", "30")
    new = tmp_path / "new"
    second = export(pair, "web", new)
    assert second["base_sequence"] > first["base_sequence"]
    import_media(pair, "web", old)  # it is this VM's, so it loads; the primary must not complete on it
    wait_for(lambda: "import the media of sequence" in (pair.status("web").get("state_detail") or ""), 60,
             "the primary to refuse the old media", interval_s=0.2, context=pair.agent.log_tail)
    assert pair.status("web")["state"] == "WaitingForInitialReplication"
    import_media(pair, "web", new)
    converge(pair, "web", disks)
