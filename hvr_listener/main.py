"""``hvr-listener``: the replica server (receives, stores and applies replication)."""

from __future__ import annotations

import sys
from pathlib import Path

from hvr_common.pure.config import parse_listener_config
from hvr_common.shell.daemon_main import run_daemon

DEFAULT_CONFIG = Path("/etc/hvr/listener.toml")


def _listener(config):
    from hvr_listener.daemon import Listener
    return Listener(config)


def _check_files(config) -> None:
    from hvr_listener.settings import configured_tls
    from hvr_common.shell.certificate_files import SERVER
    files = configured_tls(config.tls_cert, config.tls_key, config.tls_ca)
    if files is not None:
        files.check(SERVER)


def main(argv: list[str] | None = None) -> int:
    return run_daemon(argv, prog="hvr-listener",
                      description="Receive replication from primaries, store it durably and apply it to replica "
                                  "disks.",
                      default_config=DEFAULT_CONFIG, parse_config=parse_listener_config, make_root=_listener,
                      check_files=_check_files)


if __name__ == "__main__":
    sys.exit(main())
