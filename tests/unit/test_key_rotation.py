"""Two keys per principal: either signs; key ids; a key file replaced is read again by its holder."""

from __future__ import annotations

import json
import os
import time

import pytest

from hvr_common.pure.token_auth import AuthError, Key, ReplayCache, authorization, key_id, verify
from hvr_common.shell.key_file import KeyFile, read_key, write_key

DIGEST = "0" * 64
NOW = 1_800_000_000


def _verify(header: str, keys) -> str:
    return verify(header, "GET", "/v1/server", DIGEST, NOW, lambda p: keys.get(p), ReplayCache())


@pytest.mark.parametrize("installed, signer, ok", [
    ("old", "old", True),
    ("old+new", "old", True),
    ("old+new", "new", True),
    ("new", "old", False),
    ("new", "new", True),
    ("", "new", False),
])
def test_either_installed_key_signs(installed, signer, ok):
    old, new = Key("p1", b"\x01" * 32), Key("p1", b"\x02" * 32)
    by_name = {"old": old, "new": new}
    keys = {"p1": tuple(by_name[n] for n in installed.split("+") if n)}
    header = authorization(by_name[signer], "GET", "/v1/server", DIGEST, NOW)
    if ok:
        assert _verify(header, keys) == "p1"
    else:
        with pytest.raises(AuthError):
            _verify(header, keys)


def test_a_single_key_lookup_still_works():
    key = Key("p1", b"\x03" * 32)
    assert _verify(authorization(key, "GET", "/v1/server", DIGEST, NOW), {"p1": key}) == "p1"


def test_key_ids_name_keys_apart_and_reveal_nothing():
    a, b = Key("p1", b"\x01" * 32), Key("p1", b"\x02" * 32)
    assert a.key_id == key_id(a.secret) != b.key_id and len(a.key_id) == 16
    assert a.secret.hex()[:16] != a.key_id and int(a.key_id, 16) >= 0


def test_a_replaced_key_file_is_read_again(tmp_path):
    path = tmp_path / "p1.key"
    old, new = Key.generate("p1"), Key.generate("p1")
    write_key(old, path)
    source = KeyFile(path)
    assert source.current() == old
    write_key(new, path, overwrite=True)  # a new inode: seen at once
    assert source.current() == new
    assert sorted(os.listdir(tmp_path)) == ["p1.key"] and (path.stat().st_mode & 0o777) == 0o600


def test_an_unusable_replacement_keeps_the_last_good_key(tmp_path):
    path = tmp_path / "p1.key"
    key = Key.generate("p1")
    write_key(key, path)
    problems = []
    source = KeyFile(path, problems.append)
    path.write_text(json.dumps({"kind": "hvr-key", "version": 1, "principal": "p1", "secret": "bad"}))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert source.current() == key and len(problems) == 1
    assert source.current() == key and len(problems) == 1  # reported once per change
    write_key(key, path, overwrite=True)
    assert source.current() == key == read_key(path)
