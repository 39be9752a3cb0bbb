"""Every hvrctl command has an example in its help, takes -o json, and its example parses."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import pytest

from hvrctl.examples import commands
from hvrctl.main import build_parser

PARSER = build_parser()
COMMANDS = list(commands(PARSER))


def _is_leaf(sub: argparse.ArgumentParser) -> bool:
    return not any(isinstance(a, argparse._SubParsersAction) for a in sub._actions)


def test_the_walk_finds_the_commands():
    words = {" ".join(w) for w, _ in COMMANDS}
    assert {"vm add", "vm enable", "server key add", "backup begin", "backup export"} <= words
    assert len(COMMANDS) > 30


def _examples(epilog: str) -> list[str]:
    """The commands of an epilog: 'example: hvrctl ...' (several joined by &&), or an 'examples:' block whose
    lines starting with 'hvrctl' are commands (continued by a trailing backslash)."""
    if epilog.startswith("example: hvrctl "):
        return epilog.removeprefix("example: ").splitlines()[0].split("&&")
    found, current = [], None
    for line in epilog.splitlines():
        text = line.strip()
        if current is not None:
            current += " " + text.rstrip("\\")
        elif text.startswith("hvrctl "):
            current = text.rstrip("\\")
        if current is not None and not text.endswith("\\"):
            found.append(current)
            current = None
    return found


@pytest.mark.parametrize("words, sub", COMMANDS, ids=[" ".join(w) for w, _ in COMMANDS])
def test_every_command_has_an_example_that_parses(words, sub):
    assert sub.epilog and sub.epilog.startswith(("example: hvrctl ", "examples:\n")), \
        f"'hvrctl {' '.join(words)}' has no example in its help (set epilog='example: hvrctl ...')"
    help_text = sub.format_help()
    assert "example: hvrctl" in help_text or "examples:\n" in help_text
    examples = _examples(sub.epilog)
    assert examples, f"'hvrctl {' '.join(words)}' has an examples block with no command in it"
    for example in examples:
        argv = shlex.split(example, comments=True)
        assert argv[0] == "hvrctl"
        args = PARSER.parse_args(argv[1:])  # an example that no longer parses fails here (SystemExit)
        assert callable(args.func)


@pytest.mark.parametrize("words, sub", [(w, s) for w, s in COMMANDS if _is_leaf(s)],
                         ids=[" ".join(w) for w, s in COMMANDS if _is_leaf(s)])
def test_every_command_takes_output_json(words, sub):
    [output] = [a for a in sub._actions if "-o" in a.option_strings]
    assert "--output" in output.option_strings and "json" in output.choices, " ".join(words)
    assert sub.get_default("func") is not None, f"'hvrctl {' '.join(words)}' does nothing"


def test_every_command_has_its_row_in_the_hvrctl_doc():
    """docs/hvrctl.md names every command in a table row, where its JSON fields are documented."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "hvrctl.md").read_text()
    rows = [line for line in doc.splitlines() if line.startswith("| `")]
    missing = [" ".join(w) for w, s in COMMANDS if _is_leaf(s)
               and not any(f"`{' '.join(w)}`" in row or f"`{' '.join(w)} " in row for row in rows)]
    assert not missing, f"commands without a row in docs/hvrctl.md: {missing}"
