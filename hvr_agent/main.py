"""``hvr-agent``: the host's disk service (NBD exports with change tracking)."""

from __future__ import annotations

import sys
from pathlib import Path

from hvr_common.pure.config import parse_agent_config
from hvr_common.shell.daemon_main import run_daemon

DEFAULT_CONFIG = Path("/etc/hvr/agent.toml")


def _agent(config):
    from hvr_agent.daemon import Agent
    return Agent(config)


def main(argv: list[str] | None = None) -> int:
    return run_daemon(argv, prog="hvr-agent",
                      description="Serve protected VMs' disks over NBD, journaling every write into HRL logs, "
                                  "and replicate them to a replica server.",
                      default_config=DEFAULT_CONFIG, parse_config=parse_agent_config, make_root=_agent)


if __name__ == "__main__":
    sys.exit(main())
