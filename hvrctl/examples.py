"""An example in every command's help: the epilog of each command, by its words.

A command whose module sets its own ``epilog`` keeps it; every other one gets
its line from ``EXAMPLES``.  ``tests/unit/test_hvrctl_help.py`` walks the
parser and fails for a command with no example or no ``-o``.
"""

from __future__ import annotations

import argparse

EXAMPLES: dict[str, str] = {
    "vm": "hvrctl vm add web01 --disk /var/lib/hvr/web01/sys.img --disk /var/lib/hvr/web01/data.img",
    "vm add": "hvrctl vm add web01 --disk /var/lib/hvr/web01/sys.img --disk /var/lib/hvr/web01/data.img",
    "vm list": "hvrctl vm list -o json",
    "vm remove": "hvrctl vm remove web01",
    "vm cut": "hvrctl vm cut web01",
    "vm enable": "hvrctl vm enable web01 --replica-server dr1.example.com --port 8443 "
                 "--key /etc/hvr/keys/primary.key --frequency 300",
    "vm set": "hvrctl vm set web01 --recovery-history 4 --app-consistent-hours 2",
    "vm get": "hvrctl vm get web01 -o json",
    "vm measure": "hvrctl vm measure web01",
    "vm suspend": "hvrctl vm suspend web01",
    "vm resume": "hvrctl vm resume web01",
    "vm sync-now": "hvrctl vm sync-now web01",
    "initial": "hvrctl initial start web01 --wait",
    "initial start": "hvrctl initial start web01 --at 22:00",
    "server": "hvrctl server set --enabled true --listen 0.0.0.0:8443",
    "server get": "hvrctl server get -o json",
    "server set": "hvrctl server set --enabled true --listen 0.0.0.0:8443 --storage /srv/replicas",
    "server key": "hvrctl server key add /tmp/primary.example.com.key",
    "server key add": "hvrctl server key add /tmp/primary.example.com.key",
    "server key remove": "hvrctl server key remove primary.example.com",
    "server key list": "hvrctl server key list",
    "key": "hvrctl key new primary.example.com --out /etc/hvr/keys/primary.key",
    "key new": "hvrctl key new primary.example.com --out /etc/hvr/keys/primary.key",
    "replica": "hvrctl replica get web01",
    "replica get": "hvrctl replica get web01 -o json",
    "replica remove": "hvrctl replica remove web01 --delete-storage",
    "replica resume": "hvrctl replica resume web01",
    "replica suspend": "hvrctl replica suspend web01",
    "recovery-points": "hvrctl recovery-points list web01",
    "recovery-points list": "hvrctl recovery-points list web01 -o json",
    "failover": "hvrctl failover start web01 --as-test --recovery-point 12",
    "failover start": "hvrctl failover start web01 --as-test --recovery-point 12",
    "failover stop": "hvrctl failover stop web01 --as-test",
    "authz": "hvrctl authz list",
    "cert": "hvrctl cert issue replica1.example.com --ca /root/hvr-ca --out /tmp/r1 --server",
    "cert ca": "hvrctl cert ca new /root/hvr-ca",
    "hrl": "hvrctl hrl inspect /var/lib/hvr/web01/sys.img.000042.hrl --records",
    "hrl inspect": "hvrctl hrl inspect /var/lib/hvr/web01/sys.img.000042.hrl --records",
    "hrl apply": "hvrctl hrl apply /var/lib/hvr/web01/sys.img.000042.hrl /srv/copy/sys.img",
}


def commands(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()):
    """Every (words, parser) below ``parser``, groups and their verbs alike, depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield words + (name,), sub
                yield from commands(sub, words + (name,))


def attach(parser: argparse.ArgumentParser) -> None:
    """Give every command without an epilog its example."""
    for words, sub in commands(parser):
        example = EXAMPLES.get(" ".join(words))
        if not sub.epilog and example:
            sub.epilog = f"example: {example}"
