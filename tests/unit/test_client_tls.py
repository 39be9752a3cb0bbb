"""The agent's TLS context follows its replaced certificate files; unusable ones leave the last good one."""

from __future__ import annotations

import datetime as dt

from hvr_agent.client_tls import ClientTls
from hvr_common.shell.certificate_authority import issue, new_ca
from hvr_common.shell.certificate_files import CLIENT, TlsFiles
from hvr_common.shell.tls_contexts import client_context


def _watched(tmp_path):
    ca = tmp_path / "ca"
    new_ca(ca)
    cert, key = issue(ca, "host1.example", tmp_path / "out", "client")
    files = TlsFiles(ca=ca / "ca.pem", cert=cert, key=key)
    problems = []
    return ca, files, ClientTls(files, client_context(files), problems.append), problems


def test_unchanged_files_keep_the_context(tmp_path):
    _, _, tls, problems = _watched(tmp_path)
    assert tls.current() is tls.current() and problems == []


def test_a_replaced_certificate_gives_a_new_context(tmp_path):
    ca, files, tls, problems = _watched(tmp_path)
    first = tls.current()
    issue(ca, "host1.example", tmp_path / "out", "client", overwrite=True)
    second = tls.current()
    assert second is not first and problems == []
    assert tls.current() is second


def test_an_unusable_replacement_keeps_the_last_good_context_and_is_reported_once(tmp_path):
    ca, files, tls, problems = _watched(tmp_path)
    first = tls.current()
    now = dt.datetime.now(dt.timezone.utc)
    issue(ca, "host1.example", tmp_path / "out", "client", overwrite=True, not_before=now - dt.timedelta(days=9),
          not_after=now - dt.timedelta(days=1))
    assert tls.current() is first and tls.current() is first
    assert len(problems) == 1 and problems[0].code == "certificate_invalid", problems
    issue(ca, "host1.example", tmp_path / "out", "client", overwrite=True)  # fixed: taken at the next connection
    assert tls.current() is not first and len(problems) == 1
    files.check(CLIENT)
