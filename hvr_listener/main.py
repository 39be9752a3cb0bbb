"""``hvr-listener``: the replica server (receives, stores and applies replication)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from hvr_common import logs
from hvr_common.config import parse_listener_config
from hvr_common.config_file import read_toml
from hvr_common.errors import HvrError

DEFAULT_CONFIG = Path("/etc/hvr/listener.toml")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hvr-listener",
        description="Receive replication from primaries, store it durably and apply it to replica disks. "
                    "Runs in the foreground (as systemd expects); stop it with SIGTERM.")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                   help=f"TOML configuration file (default {DEFAULT_CONFIG})")
    p.add_argument("--check-config", action="store_true",
                   help="validate the configuration, print it, and exit (0 if valid)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = parse_listener_config(read_toml(args.config), str(args.config))
    except HvrError as exc:
        print(f"hvr-listener: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.check_config:
        print(f"{args.config}: configuration is valid")
        for key, value in vars(config).items():
            print(f"  {key} = {value}")
        return 0
    logs.configure(config.log_level, config.log_format)
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        uvloop = None
    from hvr_listener.daemon import Listener
    try:
        runner = uvloop.run if uvloop is not None else asyncio.run
        runner(Listener(config).run())
    except HvrError as exc:
        print(f"hvr-listener: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
