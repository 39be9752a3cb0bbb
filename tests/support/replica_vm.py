"""A replica VM set up through the listener's replication API, its expected images kept in memory.

Used by the API tests and the listener crash test; it drives the API with the
hand-written signed client of :mod:`listener_process`.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

from bundles import bundle, hrl_bytes
from daemons import wait_for
from hvr_common.pure.bundle import BundleKind
from hvrctl.client import AdminClient
from listener_process import ListenerProcess, call, call_json

MiB = 1024 * 1024
SIZE = 4 * MiB


class Vm:
    """A replica VM set up through the API, with the expected image contents kept in memory."""

    def __init__(self, lp: ListenerProcess, name: str, *, disks: int = 1, initial: bool = True):
        self.lp = lp
        self.vm_id = uuid.uuid4()
        self.disk_ids = [uuid.uuid4() for _ in range(disks)]
        self.name = name
        self.expected = [bytearray(SIZE) for _ in range(disks)]
        r = call_json(lp.port, "PUT", f"/v1/replicas/{self.vm_id}", self.enable_body(), key=lp.key, tls=lp.client_tls)
        assert r.status == 201, r.body
        if initial:
            self.initial()

    def enable_body(self) -> dict:
        return {"name": self.name, "generation": 1, "frequency_s": 30, "compression": True,
                "disks": [{"disk_id": str(d), "name": f"d{i}", "size_bytes": SIZE}
                          for i, d in enumerate(self.disk_ids)]}

    def initial(self) -> None:
        for i in range(len(self.disk_ids)):
            for start in range(0, SIZE, 2 * MiB):
                self.send_initial_window(i, start)
        self.complete_initial()

    def send_initial_window(self, i: int, start: int) -> None:
        """The initial copy's window of disk ``i`` from ``start`` (2 MiB); the first holds 64 KiB of data at 1 MiB."""
        disk_id = self.disk_ids[i]
        ops = []
        if start == 0:
            data = os.urandom(65536)
            self.expected[i][MiB:MiB + len(data)] = data
            ops = [("write", MiB, data)]
        log = hrl_bytes(self.vm_id, disk_id, 1, 0, SIZE, ops)
        body = bundle(BundleKind.INITIAL, self.vm_id, 1, 0, [(disk_id, SIZE, start, start + 2 * MiB, log)])
        r = call(self.lp.port, "PUT", f"/v1/replicas/{self.vm_id}/initial/{disk_id}?offset={start}"
                 f"&end={start + 2 * MiB}", body, key=self.lp.key, headers={"X-Hvr-Generation": "1"},
                 tls=self.lp.client_tls)
        assert r.status == 200, r.body

    def complete_initial(self) -> None:
        r = call_json(self.lp.port, "POST", f"/v1/replicas/{self.vm_id}/initial/complete",
                      {"generation": 1, "next_sequence": 1}, key=self.lp.key, tls=self.lp.client_tls)
        assert r.status == 200, r.body
        assert r.json()["state"] == "Replicating"

    def cycle_body(self, seq: int, ops_per_disk: list[list[tuple]], generation: int = 1, compress=True,
                   created_ns: int | None = None, streamed: bool = False) -> bytes:
        disks = []
        for disk_id, ops in zip(self.disk_ids, ops_per_disk):
            disks.append((disk_id, SIZE, 0, SIZE, hrl_bytes(self.vm_id, disk_id, generation, seq, SIZE, ops)))
        return bundle(BundleKind.CYCLE, self.vm_id, generation, seq, disks, compress=compress, created_ns=created_ns,
                      streamed=streamed)

    def put_cycle(self, seq: int, body: bytes, *, generation: int = 1, **kw):
        return call(self.lp.port, "PUT", f"/v1/replicas/{self.vm_id}/cycles/{seq}", body, key=kw.pop("key", self.lp.key),
                    tls=kw.pop("tls", self.lp.client_tls),
                    headers={"X-Hvr-Generation": str(generation), "Content-Type": "application/x-hvr-bundle"}, **kw)

    def stream_cycle(self, seq: int, body: bytes, *, generation: int = 1, **kw):
        """The streamed form's body (digest header all zeroes: the digest comes with the commit)."""
        return call(self.lp.port, "PUT", f"/v1/replicas/{self.vm_id}/cycles/{seq}/stream", body,
                    key=kw.pop("key", self.lp.key), tls=kw.pop("tls", self.lp.client_tls), digest="0" * 64,
                    headers={"X-Hvr-Generation": str(generation), "Content-Type": "application/x-hvr-bundle"}, **kw)

    def commit_cycle(self, seq: int, sha256: str, length: int, *, generation: int = 1):
        return call_json(self.lp.port, "POST", f"/v1/replicas/{self.vm_id}/cycles/{seq}/commit",
                         {"sha256": sha256, "bytes": length}, key=self.lp.key, tls=self.lp.client_tls,
                         headers={"X-Hvr-Generation": str(generation)})

    def state(self) -> dict:
        r = call(self.lp.port, "GET", f"/v1/replicas/{self.vm_id}", key=self.lp.key, tls=self.lp.client_tls)
        assert r.status == 200, r.body
        return r.json()

    def folder(self) -> Path:
        """The replica's folder as the listener recorded it (its VM id under its storage location)."""
        return Path(AdminClient(self.lp.admin_socket, "hvr-listener").request("GET", f"/v1/replicas/{self.name}")
                    ["storage"])

    def image_paths(self) -> list[Path]:
        return [self.folder() / f"d{i}.img" for i in range(len(self.disk_ids))]

    def snapshot(self) -> tuple:
        return (tuple(hashlib.sha256(p.read_bytes()).hexdigest() for p in self.image_paths()),
                json.dumps(self.state(), sort_keys=True))

    def wait_applied(self, seq: int) -> None:
        wait_for(lambda: self.state()["last_applied_sequence"] >= seq, 30, f"cycle {seq} of {self.name} applied",
                 context=self.lp.log_tail)

    def assert_images(self) -> None:
        for path, exp in zip(self.image_paths(), self.expected):
            assert path.read_bytes() == bytes(exp), f"{path} differs from the expected contents"
