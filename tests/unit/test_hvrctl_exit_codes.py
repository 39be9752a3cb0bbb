"""Every exit code hvrctl can end with is in the exit-code table of docs/hvrctl.md, and a local folder that is
not one is a usage error named before any daemon is asked."""

from __future__ import annotations

import re
from pathlib import Path

from hvr_common.pure.wire.error_catalogue import CATALOGUE
from hvrctl import main as hvrctl_main

DOC = Path(__file__).resolve().parents[2] / "docs" / "hvrctl.md"


def _documented_exit_codes() -> set[int]:
    text = DOC.read_text()
    table = text[text.index("## Exit codes"):text.index("## Commands and their JSON")]
    return {int(m) for m in re.findall(r"^\| *(\d+) \|", table, re.M)}


def test_every_exit_code_is_documented():
    codes = {entry.exit_code for entry in CATALOGUE.values()} | set(hvrctl_main._OS_EXIT_CODES.values())
    codes |= {0, 74, 130}  # success, another local I/O error, Ctrl-C
    missing = codes - _documented_exit_codes()
    assert not missing, f"exit codes missing from the table of docs/hvrctl.md: {sorted(missing)}"


def test_backup_export_into_a_file_is_refused_before_asking_the_listener(capsys, tmp_path):
    not_a_folder = tmp_path / "web.raw"
    not_a_folder.write_bytes(b"keep me")
    rc = hvrctl_main.main(["--listener-socket", str(tmp_path / "no.sock"), "backup", "export", "web",
                           str(not_a_folder)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert f"{not_a_folder} is not a folder" in err and "hvrctl: hint: name a folder" in err
    assert not_a_folder.read_bytes() == b"keep me"
