"""``hvrctl initial export`` and ``hvrctl initial import``: initial replication from external media.

Export runs on the primary (the agent's socket), import on the replica server
(the listener's socket); both draw a progress bar on stderr while the daemon
reports (:mod:`hvrctl.progress`: none with ``-o json``; docs/initial-media.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hvrctl.client import AdminClient
from hvrctl.output import emit_json, human_bytes, kv
from hvrctl.progress import Bar, progress_bar

# a media export or import of a big disk is one long request: no client-side timeout worth the name
LONG_REQUEST_TIMEOUT_S = 7 * 24 * 3600.0


def register(isub, common) -> None:
    p = isub.add_parser(
        "export", parents=[common], help="write the VM's initial copy to a folder (external media)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Start-VMInitialReplication -DestinationPath, on the primary: cut the VM once (the export "
                    "point) and write a checksummed, sparse copy of every disk and a manifest to DIR while the VM "
                    "runs on. The VM then shows WaitingForInitialReplication until the media is imported on the "
                    "replica server; then the changes since the export point are shipped as cycles.",
        epilog="examples:\n  hvrctl initial export web1 /mnt/usb/web1\n"
               "then carry /mnt/usb/web1 to the replica server and run there:\n"
               "  hvrctl initial import web1 /mnt/usb/web1")
    p.add_argument("name", metavar="NAME", help="a VM whose replication is enabled (ReadyForInitialReplication)")
    p.add_argument("directory", metavar="DIR", type=Path, help="an empty or new folder (absolute path)")
    p.add_argument("--chunk-size", type=int, metavar="BYTES", default=None,
                   help="bytes per chunk file (a multiple of 4096; default 4 MiB)")
    p.set_defaults(func=cmd_export)
    p = isub.add_parser(
        "import", parents=[common], help="load exported media into the replica (on the replica server)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Import-VMInitialReplication, on the replica server: check the manifest and every chunk of "
                    "DIR (a changed chunk or manifest, or media of another VM, is refused and nothing changes), "
                    "then load it into the replica's images. The primary notices within seconds, completes the "
                    "initial replication and ships the changes since the export point.",
        epilog="examples:\n  hvrctl initial import web1 /mnt/usb/web1")
    p.add_argument("name", metavar="NAME", help="the replica VM (hvrctl replica list)")
    p.add_argument("directory", metavar="DIR", type=Path, help="the folder hvrctl initial export wrote")
    p.set_defaults(func=cmd_import)


def cmd_export(args) -> int:
    client = AdminClient(args.agent_socket, "hvr-agent", timeout_s=LONG_REQUEST_TIMEOUT_S)
    body: dict = {"directory": str(args.directory.absolute())}
    if args.chunk_size is not None:
        body["chunk_bytes"] = args.chunk_size
    with progress_bar("exporting", None, output=args.output) as bar:
        result = client.stream("POST", f"/v1/vms/{args.name}/replication/initial/export", body,
                               lambda p: _feed(bar, p))
    return _show(args, result, f"exported VM {args.name}", f"next: hvrctl initial import {args.name} DIR on the "
                                                           "replica server")


def cmd_import(args) -> int:
    client = AdminClient(args.listener_socket, "hvr-listener", timeout_s=LONG_REQUEST_TIMEOUT_S)
    body = {"directory": str(args.directory.absolute())}
    with progress_bar("checking", None, output=args.output) as bar:
        result = client.stream("POST", f"/v1/replicas/{args.name}/initial/import", body, lambda p: _feed(bar, p))
    return _show(args, result, f"imported VM {args.name}", "the primary completes the initial replication and "
                                                           "ships the changes since the export point")


def _show(args, result: dict, title: str, next_step: str) -> int:
    if args.output == "json":
        emit_json(result)
        return 0
    print(kv([("result", title), ("directory", result["directory"]), ("export point", result["base_sequence"]),
              ("data", human_bytes(result["data_bytes"])), ("manifest blake3", result["manifest_blake3"]),
              ("state", result["state"])]))
    print(f"\n{next_step}")
    return 0


def _feed(bar: Bar, p: dict) -> None:
    """Move the bar to the daemon's progress object (its phase names the step of an import)."""
    bar.update(p.get("done_bytes", 0), total=p.get("total_bytes") or None,
               description={"verify": "checking", "load": "loading"}.get(p.get("phase"), bar.description))
