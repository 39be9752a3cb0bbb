"""The agent's export catalogue: every disk of every protected VM, served as ``VM/DISK``.

It adapts :class:`~hvr_agent.vms.VmRegistry` to the NBD server's
:class:`~hvr_common.block.catalogue.ExportCatalogue`.  Each VM is one group:
when the VM is removed, every connection to one of its disks is dropped
(``nbd_connection_closed`` with ``reason=vm_removed``).  A VM prepared for
a planned failover (``VmRegistry.refused``) takes no new client: its exports
are not found until the failover is cancelled.
"""

from __future__ import annotations

from hvr_common.block.catalogue import Export, Withdrawn
from hvr_common.pure.nbd_events import ExportInfo
from hvr_common.pure.names import is_export_name
from hvr_common.pure.nbd_wire import MAX_PAYLOAD
from hvr_agent.vms import VmRegistry


class VmExports:
    def __init__(self, registry: VmRegistry):
        self.registry = registry

    def lookup(self, name: str) -> Export | None:
        if not is_export_name(name):  # what a client asks for is checked before it is used anywhere
            return None
        found = self.registry.export(name)
        if found is None:
            return None
        vm, disk = found
        if vm.name in self.registry.refused:
            return None
        info = ExportInfo(name=name, size=disk.size, read_only=disk.read_only,
                          description=f"hvr disk {disk.identity.disk} of VM {vm.name}",
                          multi_conn=True, max_block=MAX_PAYLOAD)
        return Export(info, disk, vm.name)

    def exports(self) -> list[ExportInfo]:
        return [found.info for name in self.registry.export_names() if (found := self.lookup(name))]

    def on_withdrawn(self, callback: Withdrawn) -> None:
        # VmRegistry.remove unexports the VM, then calls these in order (the server's first).
        self.registry.on_remove.append(lambda vm: callback(vm, "vm_removed"))
