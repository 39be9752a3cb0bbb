"""Protected VMs on this host: their tracked disks, exports, cuts and recovery."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from hvr_common.block.blockdev import RawImage
from hvr_common.pure.config import AgentConfig
from hvr_common.pure.errors import ConflictError, HvrError, NotFoundError, UsageError
from hvr_common.pure.input_limits import quoted
from hvr_common.pure.names import check_name, storage_location_problem
from hvr_common.pure.tracking_mode import DEFAULT_TRACKING, TrackingMode
from hvr_common.shell.logs import event
from hvr_agent.intent import IntentBitmapFile, bitmap_path
from hvr_agent.journal import ClosedLog
from hvr_agent.recovery import recover_vm
from hvr_agent.store import AgentStore, VmRecord
from hvr_agent import digest_cache
from hvr_agent.image_stamp import changed_since_close, write_stamp
from hvr_agent.tracker import DiskIdentity, TrackedDisk

log = logging.getLogger("hvr.agent.vms")

def disk_name_for(path: Path) -> str:
    return path.stem if path.suffix else path.name


@dataclass
class ProtectedVm:
    record: VmRecord
    disks: dict[str, TrackedDisk] = field(default_factory=dict)
    sequence: int = 0  # sequence of the active logs
    cut_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # closed sequence -> the task making that cut durable (VmRegistry.begin_cut); a failed one stays
    settling: dict[int, asyncio.Future] = field(default_factory=dict)
    # disk -> how its image changed while the agent did not serve it (image_stamp); the replication
    # task turns it into a resync and clears it
    changed_offline: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.record.name

    def status(self) -> dict:
        return {
            "name": self.name,
            "vm_id": str(self.record.vm_id),
            "generation": self.record.generation,
            "read_only": self.record.read_only,
            "tracking": self.record.tracking.value,
            "sequence": self.sequence,
            "failover": self.record.failover,  # a failed-over VM served here: waiting_completion | completed
            "disks": [dict(d.status(), export=f"{self.name}/{n}") for n, d in self.disks.items()],
        }


class VmRegistry:
    def __init__(self, config: AgentConfig, store: AgentStore):
        self.config = config
        self.store = store
        self.vms: dict[str, ProtectedVm] = {}
        self._exports: dict[str, tuple[ProtectedVm, TrackedDisk]] = {}
        self.on_remove: list[Callable[[str], None]] = []
        self.unavailable: dict[str, tuple[VmRecord, str]] = {}  # registered but could not be opened
        self._admin_lock = asyncio.Lock()
        self.refused: set[str] = set()  # VMs whose exports take no new NBD client (prepared for failover)
        self.nbd_clients: Callable[[str], int] = lambda _vm: 0  # the NBD server's count, per VM (daemon.py)

    # --- exports (served through hvr_agent.exports) -------------------------
    def export(self, name: str) -> tuple[ProtectedVm, TrackedDisk] | None:
        """The VM and disk exported as ``name`` (``VM/DISK``), or None."""
        return self._exports.get(name)

    def export_names(self) -> list[str]:
        return sorted(self._exports)

    def disk_for_export(self, name: str) -> TrackedDisk | None:
        found = self._exports.get(name)
        return found[1] if found else None

    # --- lifecycle --------------------------------------------------------
    async def load_all(self) -> None:
        """Open every registered VM; one that cannot be opened is kept aside as unavailable
        (listed with its error, removable) so it does not stop the others."""
        records = await asyncio.to_thread(self.store.list_vms)
        for rec in records:
            try:
                await self._open_vm(rec)
            except (HvrError, OSError) as exc:
                self.unavailable[rec.name] = (rec, str(exc))
                event(log, "vm_unavailable", logging.ERROR, vm=rec.name, error=str(exc),
                      hint="fix the cause and restart the agent, or: hvrctl vm remove " + rec.name)

    def unavailable_status(self) -> list[dict]:
        return [{"name": rec.name, "vm_id": str(rec.vm_id), "generation": rec.generation,
                 "read_only": rec.read_only, "tracking": rec.tracking.value, "state": "Unavailable", "error": error, "sequence": None,
                 "disks": [{"name": d.name, "disk_id": str(d.disk_id), "path": str(d.path), "export": None,
                            "size_bytes": None, "read_only": rec.read_only, "sequence": None,
                            "active_log": None} for d in rec.disks]}
                for rec, error in self.unavailable.values()]

    async def add(self, name: str, paths: list[str], read_only: bool,
                  tracking: TrackingMode = DEFAULT_TRACKING) -> ProtectedVm:
        check_name("VM", name)
        if not paths:
            raise UsageError("a VM needs at least one disk", hint="pass --disk PATH")
        disks: list[tuple[str, Path]] = []
        for raw in paths:
            problem = storage_location_problem(raw)  # absolute; no NUL, control characters or '..'
            if problem is not None:
                raise UsageError(f"disk path {problem}, not {quoted(raw)}")
            path = Path(raw)
            dname = disk_name_for(path)
            check_name("disk", dname)
            if any(d == dname for d, _ in disks):
                raise UsageError(f"two disks of VM {name!r} would both be named {dname!r}",
                                 hint="give the image files different names")
            disks.append((dname, path.resolve()))
        vm = await self.register(name, [p for _, p in disks],
                                 lambda: self.store.add_vm(name, disks, read_only, tracking))
        event(log, "vm_added", vm=name, disks=[str(p) for _, p in disks], read_only=read_only,
              tracking=tracking.value)
        return vm

    async def register(self, name: str, paths: list[Path], record: Callable[[], VmRecord]) -> ProtectedVm:
        """Open the images, record the VM (``record`` runs in a thread), open it; a failure changes nothing."""
        async with self._admin_lock:
            if name in self.vms or name in self.unavailable:
                raise ConflictError(f"a VM named {name!r} is already registered")
            for path in paths:  # every image opens before anything is recorded
                RawImage(path, read_only=True).close_fd()
            rec = await asyncio.to_thread(record)
            try:
                return await self._open_vm(rec)
            except Exception:
                await asyncio.to_thread(self.store.remove_vm, name)
                raise

    def log_base(self, vm: str, disk: str, path: Path, is_block_device: bool) -> Path:
        """Where a disk's logs and bitmap live: next to an image file; for a block device (whose
        folder is /dev), in ``state_dir/blockdev-logs/VM/`` under the disk's name."""
        if not is_block_device:
            return path
        folder = self.config.state_dir / "blockdev-logs" / vm
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        return folder / disk

    async def _open_vm(self, rec: VmRecord) -> ProtectedVm:
        vm = ProtectedVm(rec)
        opened: list[TrackedDisk] = []
        try:
            for d in rec.disks:
                device = RawImage(d.path, read_only=rec.read_only)
                ident = DiskIdentity(rec.name, rec.vm_id, d.name, d.disk_id, rec.generation)
                log_base = self.log_base(rec.name, d.name, d.path, device.is_block_device)
                intent = IntentBitmapFile(bitmap_path(log_base), device.size, self.config.bitmap_region_bytes)
                disk = TrackedDisk(device, d.path, ident, intent, buffer_limit=self.config.journal_buffer_bytes,
                                   log_base=log_base, bitmap=rec.tracking is TrackingMode.BITMAP,
                                   cbw_budget_bytes=self.config.cbw_budget_bytes,
                                   cbw_max_age_s=self.config.cbw_max_age_s)
                opened.append(disk)
                vm.disks[d.name] = disk
                changed = await asyncio.to_thread(changed_since_close, d.path, log_base)
                await asyncio.to_thread(digest_cache.attach, disk, changed is None)  # before recovery marks
                if changed is not None:
                    vm.changed_offline[d.name] = changed
                    event(log, "image_changed_offline", logging.WARNING, vm=rec.name, disk=d.name, reason=changed)
            if not rec.read_only:
                await self._recover(vm)
        except BaseException:
            for disk in opened:
                disk.device.close_fd()
                disk.intent.close()
            raise
        self.vms[rec.name] = vm
        for dname, disk in vm.disks.items():
            self._exports[f"{rec.name}/{dname}"] = (vm, disk)
        return vm

    async def _recover(self, vm: ProtectedVm) -> None:
        await recover_vm(vm, self.store, log)

    async def set_tracking(self, name: str, tracking: TrackingMode, *, shipped: bool) -> ProtectedVm:
        """Switch the VM's tracking mode: recorded, then taken at a cut made now (the cycle it closes
        is shipped as it was tracked)."""
        vm = self.vms.get(name)
        if vm is None:
            raise NotFoundError(f"no VM named {name!r} is registered")
        if vm.record.read_only:
            raise UsageError(f"VM {name!r} is exported read-only: it tracks nothing")
        if vm.record.tracking is tracking:
            return vm
        await self.plan_tracking(name, tracking)
        await self.cut(name, shipped=shipped)
        event(log, "vm_tracking_changed", vm=name, tracking=tracking.value, seq=vm.sequence)
        return vm

    async def plan_tracking(self, name: str, tracking: TrackingMode) -> None:
        """Record the VM's tracking mode; its next cut takes it (a crash before opens the VM in it)."""
        vm = self.vms[name]
        await asyncio.to_thread(self.store.set_tracking, name, tracking)
        vm.record = replace(vm.record, tracking=tracking)
        for disk in vm.disks.values():
            disk.switch_to = tracking is TrackingMode.BITMAP

    async def acknowledged(self, name: str, sequence: int) -> None:
        """The replica holds cycle ``sequence`` durably: bitmap-tracked disks may forget its regions."""
        vm = self.vms.get(name)
        if vm is None:
            return
        for disk in vm.disks.values():
            await disk.acknowledged(sequence)

    async def remove(self, name: str) -> None:
        """Unregister: the database row goes first (the commit point), then exports and logs close."""
        async with self._admin_lock:
            if name in self.unavailable:
                await asyncio.to_thread(self.store.remove_vm, name)
                del self.unavailable[name]
                event(log, "vm_removed", vm=name, was_unavailable=True)
                return
            vm = self.vms.get(name)
            if vm is None:
                raise NotFoundError(f"no VM named {name!r} is registered")
            await asyncio.to_thread(self.store.remove_vm, name)
            self._unexport(vm)
            self.refused.discard(name)  # a VM of that name registered later (a failback) takes clients again
            for cb in self.on_remove:
                cb(name)
            try:
                await self._close_vm(vm, end_logs=True)
            except (HvrError, OSError) as exc:
                event(log, "vm_close_failed", logging.ERROR, vm=name, error=str(exc),
                      hint="the VM is unregistered; its last log may lack its END record")
        event(log, "vm_removed", vm=name)

    def _unexport(self, vm: ProtectedVm) -> None:
        del self.vms[vm.name]
        for dname in vm.disks:
            self._exports.pop(f"{vm.name}/{dname}", None)

    async def _close_vm(self, vm: ProtectedVm, *, end_logs: bool, stamp: bool = False) -> None:
        async with vm.cut_lock:
            for disk in vm.disks.values():
                await disk.close(end_log=end_logs)
                if stamp and end_logs and not disk.read_only and disk.log is None:  # a clean stop: stamp the image
                    try:
                        await asyncio.to_thread(write_stamp, disk.image_path, disk.log_base)
                        await asyncio.to_thread(digest_cache.save, disk)
                    except OSError as exc:
                        event(log, "image_stamp_failed", logging.WARNING, vm=vm.name, disk=disk.identity.disk,
                              error=str(exc))
                elif not stamp:  # removed: its digests go with it
                    await asyncio.to_thread(digest_cache.remove, disk.log_base)

    async def cut(self, name: str, *, shipped: bool = True) -> list[ClosedLog]:
        """Switch all the VM's disks to new logs at one instant; return the closed logs once durable.
        ``shipped``: a cycle will carry the closed sequence (bitmap mode keeps its blocks for it)."""
        closed = await self.begin_cut(name, shipped=shipped)
        await self.durable(name, closed[0].sequence)
        return closed

    async def begin_cut(self, name: str, *, shipped: bool = True) -> list[ClosedLog]:
        """Switch all the VM's disks to new logs at one instant; return the closed logs at once.
        A task (``vm.settling[sequence]`` until it succeeded) makes them and the images durable
        and shrinks the bitmap.

        The closed logs are complete in the page cache as soon as they are switched (their END
        records are written), so they can be read meanwhile, e.g. to build a cycle's bundle;
        nothing of them may leave the host before :meth:`durable` returned for their sequence.
        The next cut of the VM waits for the task; no one cancels it.  If it fails, the VM
        takes no more cuts and that cycle is never declared durable until the agent restarts:
        after a failed fdatasync a second one can report success for data that was lost.
        """
        vm = self.vms.get(name)
        if vm is None:
            raise NotFoundError(f"no VM named {name!r} is registered")
        if vm.record.read_only:
            raise UsageError(f"VM {name!r} is exported read-only: it has no logs to cut")
        await vm.cut_lock.acquire()
        try:
            for seq, earlier in vm.settling.items():
                if earlier.done():  # only failed ones stay
                    raise _not_durable(name, seq)
            started = time.monotonic()
            new_seq = vm.sequence + 1
            # One synchronous step of the event loop: no guest write can land between disks.
            olds = self._switch_all(vm, new_seq)
            if not shipped:
                for disk, _ in olds:
                    if disk.dirty is not None:
                        disk.dirty.discard_upto(new_seq - 1)
        except BaseException:
            vm.cut_lock.release()
            raise
        vm.sequence = new_seq
        closed = [old.describe_closed(disk.identity.disk) for disk, old in olds]
        settled = asyncio.ensure_future(self._settle_cut(vm, olds, new_seq, started, shipped))
        vm.settling[new_seq - 1] = settled

        def settled_done(task: asyncio.Future) -> None:
            vm.cut_lock.release()  # here, not in the task: it runs even if the task never started
            if not task.cancelled() and task.exception() is None:
                del vm.settling[new_seq - 1]

        settled.add_done_callback(settled_done)
        return closed

    async def durable(self, name: str, sequence: int) -> None:
        """Return once the cut that closed ``sequence`` settled (at once if it did long ago, or
        before the agent started); raise if its logs could not be made durable."""
        vm = self.vms.get(name)
        settled = vm.settling.get(sequence) if vm is not None else None
        if settled is None:
            return
        await asyncio.wait([settled])  # (being cancelled here leaves the task alone)
        if settled.cancelled() or settled.exception() is not None:
            raise _not_durable(name, sequence)

    async def _settle_cut(self, vm: ProtectedVm, olds: list, new_seq: int, started: float, shipped: bool) -> None:
        """The second half of a cut, under the VM's cut lock taken by :meth:`begin_cut`."""
        try:
            closed = [await disk.finish_cut(old, shipped) for disk, old in olds]
            await asyncio.to_thread(self.store.set_next_sequence, vm.name, new_seq + 1)
        except BaseException as exc:
            event(log, "vm_cut_failed", logging.ERROR, vm=vm.name, seq=new_seq - 1,
                  error=str(exc) or type(exc).__name__,
                  hint="check the storage of the VM's images (the kernel log says more), then restart the agent")
            raise
        event(log, "vm_cut", vm=vm.name, seq=new_seq - 1, bytes=sum(c.write_bytes for c in closed),
              latency_s=round(time.monotonic() - started, 6))

    @staticmethod
    def _switch_all(vm: ProtectedVm, new_seq: int):
        """Switch every disk of the VM to log ``new_seq``, all or nothing (no await inside).

        1. create every next log; 2. write every active log's END record; 3. switch.
        A failure in 1 or 2 (a full disk, a leftover file) undoes what was done, so the
        VM keeps writing its current logs and the error says why the cut failed.
        """
        disks = list(vm.disks.values())
        prepared = []
        ended = []
        try:
            for disk in disks:
                prepared.append(disk.prepare_log(new_seq))
            for disk in disks:
                disk.log.write_end()
                ended.append(disk)
        except OSError as exc:
            for disk in ended:
                disk.log.unend()
            for new in prepared:
                new.discard()
            what = f" ({exc.filename})" if exc.filename else ""
            raise HvrError(f"cannot cut the logs of VM {vm.name}: {exc.strerror or exc}{what}",
                           hint="the VM goes on writing its current logs; free space on the images' file "
                                "system (or remove the leftover log file) and cut again") from None
        return [(disk, disk.commit_log(new)) for disk, new in zip(disks, prepared)]

    async def close_all(self) -> None:
        for vm in list(self.vms.values()):
            self._unexport(vm)
            await self._close_vm(vm, end_logs=True, stamp=True)



def _not_durable(vm: str, sequence: int) -> HvrError:
    return HvrError(f"the logs of cycle {sequence} of VM {vm!r} could not be made durable (see the vm_cut_failed "
                    "event): the VM takes no more cuts and ships nothing from that cycle on",
                    hint="check the storage of the VM's images (the kernel log says more), then restart the "
                         "agent: its recovery re-journals every region the write-intent bitmap still marks")
