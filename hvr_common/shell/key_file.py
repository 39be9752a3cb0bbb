"""Key files of token authentication: JSON, created 0600 (an overwrite replaces the file atomically)."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

from hvr_common.pure.errors import ConflictError, HvrError, UsageError
from hvr_common.pure.input_limits import quoted
from hvr_common.pure.token_auth import SECRET_BYTES, Key, check_principal
from hvr_common.shell.files import write_private_file

MAX_KEY_FILE_BYTES = 64 * 1024


def write_key(key: Key, path: Path, *, overwrite: bool = False) -> None:
    """Write ``key`` to ``path`` (0600).  ``overwrite`` writes a temporary file and renames it over
    ``path``, so a reader (an agent re-reading its key) sees the old key or the new one, never a mix."""
    body = json.dumps({"kind": "hvr-key", "version": 1, "principal": key.principal,
                       "secret": base64.b64encode(key.secret).decode()}, indent=2) + "\n"
    write_private_file(path, body.encode(), overwrite=overwrite,
                       exists_hint="choose another path or remove the old key first")


class KeyFile:
    """A key file that is read again when it changes: a primary rotates its key by replacing the file.

    :meth:`current` looks at the file's identity (inode, size, change time)
    and reads it again only when that moved; a file that cannot be read or
    is not a valid key leaves the last good key in use (reported once per
    change through ``on_problem``).
    """

    def __init__(self, path: Path, on_problem=None):
        self.path = Path(path)
        self._on_problem = on_problem
        self._identity = self._stat()
        self._key = read_key(self.path)

    def _stat(self) -> tuple | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def current(self) -> Key:
        identity = self._stat()
        if identity is not None and identity != self._identity:
            self._identity = identity
            try:
                self._key = read_key(self.path)
            except HvrError as exc:
                if self._on_problem is not None:
                    self._on_problem(exc)
        return self._key


def read_key(path: Path) -> Key:
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"key file {path} is not a regular file")
        with open(path, "rb") as fh:
            data = fh.read(MAX_KEY_FILE_BYTES + 1)
    except FileNotFoundError:
        raise UsageError(f"key file {path} does not exist", hint="create one with: hvrctl key new PRINCIPAL --out FILE") from None
    except PermissionError:
        raise UsageError(f"key file {path} is not readable by this user",
                         hint="run as the key file's owner or root (a key file is 0600)") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise UsageError(f"key file {path} is not valid: larger than {MAX_KEY_FILE_BYTES} bytes")
    try:
        raw = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"key file {path} is not valid: not text (not a key made by hvrctl key new)") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UsageError(f"key file {path} is readable by others (mode {stat.S_IMODE(st.st_mode):04o})",
                         hint=f"chmod 600 {path}")
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        if doc.get("kind") != "hvr-key" or doc.get("version") != 1:
            raise ValueError("not an hvr key file (kind/version)")
        secret = base64.b64decode(doc["secret"], validate=True)
        principal = doc["principal"]
        if not isinstance(principal, str):
            raise ValueError("principal must be a string")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UsageError(f"key file {path} is not valid: {quoted(str(exc))}") from None
    try:
        check_principal(principal)
    except HvrError as exc:
        raise UsageError(f"key file {path} is not valid: {exc.message}", hint=exc.hint) from None
    if len(secret) != SECRET_BYTES:
        raise UsageError(f"key file {path}: secret must be {SECRET_BYTES} bytes, not {len(secret)}")
    return Key(principal, secret)
