"""The common ``main()`` of the daemons: arguments, configuration, logging, the event loop.

Each daemon passes its name, description, default config path, config
parser and a factory for its composition root; this runs it in the
foreground (uvloop when available) and turns errors into exit codes.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from pathlib import Path

from hvr_common.shell import logs
from hvr_common.shell.heap_limits import bound_heap
from hvr_common.shell.config_file import read_toml
from hvr_common.pure.errors import HvrError


def run_daemon(argv: list[str] | None, *, prog: str, description: str, default_config: Path,
               parse_config: Callable[[dict, str], object], make_root: Callable[[object], object],
               check_files: Callable[[object], None] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description=description + " Runs in the foreground (as systemd expects); stop it with SIGTERM.")
    parser.add_argument("--config", type=Path, default=default_config,
                        help=f"TOML configuration file (default {default_config})")
    parser.add_argument("--check-config", action="store_true",
                        help="validate the configuration, print it, and exit (0 if valid)")
    args = parser.parse_args(argv)
    try:
        config = parse_config(read_toml(args.config), str(args.config))
        if check_files is not None:  # files the configuration names (certificates): refused here too
            check_files(config)
    except HvrError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.check_config:
        print(f"{args.config}: configuration is valid")
        for key, value in vars(config).items():
            print(f"  {key} = {value}")
        return 0
    logs.configure(config.log_level, config.log_format)
    bound_heap()  # before any worker thread exists: see heap_limits
    try:
        import uvloop
        run = uvloop.run
    except ImportError:  # pragma: no cover - optional speed-up
        run = asyncio.run
    try:
        run(make_root(config).run())
    except HvrError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return 0
