"""Replica server settings (Get-/Set-VMReplicationServer) and the key cache.

Settings live in SQLite; this object keeps the current values and the
installed keys in memory for the request path and validates changes.
"""

from __future__ import annotations

from pathlib import Path

from hvr_common.pure.config import parse_endpoint
from hvr_common.pure.errors import UsageError
from hvr_common.pure.names import check_storage_location
from hvr_common.pure.token_auth import Key
from hvr_common.shell.certificate_files import SERVER, TlsFiles
from hvr_listener.store import ListenerStore

AUTH_MODES = ("token", "certificate")
TLS_SETTINGS = ("tls_cert", "tls_key", "tls_ca")  # set with hvrctl server set --cert --cert-key --ca


def configured_tls(cert: Path | str | None, key: Path | str | None, ca: Path | str | None) -> TlsFiles | None:
    """The server's TLS files when all three are given (None: plain HTTP); refuses some of them only."""
    given = [bool(v) for v in (cert, key, ca)]
    if not any(given):
        return None
    if not all(given):
        raise UsageError("the server certificate, its key and the CA bundle go together: give all three or none",
                         hint="hvrctl server set --cert FILE --cert-key FILE --ca FILE")
    return TlsFiles(ca=Path(ca), cert=Path(cert), key=Path(key))


class ServerSettings:
    def __init__(self, store: ListenerStore, server_name: str, listen: tuple[str, int], storage: str,
                 tls: TlsFiles | None = None):
        self.store = store
        self.configured_tls = tls  # listener.toml's; the stored settings (server set --cert ...) take precedence
        self.server_name = server_name
        self.listen = listen
        self.storage = storage
        self._settings = store.settings()
        self.bound: tuple[str, int] | None = None  # where the replication API really listens
        self._keys = store.keys()

    def storage_dir(self) -> str:
        """Where new replicas are created (existing ones stay where they are)."""
        return self._settings.get("default_storage") or self.storage

    def listen_endpoint(self) -> tuple[str, int]:
        value = self._settings.get("listen")
        return parse_endpoint(value) if value else self.listen

    def current(self) -> dict:
        return self._settings

    def tls_files(self, settings: dict | None = None) -> TlsFiles | None:
        """The files of TLS (None: plain HTTP): the stored settings', else listener.toml's."""
        s = self._settings if settings is None else settings
        if any(s.get(k) for k in TLS_SETTINGS):
            return configured_tls(*(s.get(k) for k in TLS_SETTINGS))
        return self.configured_tls

    def requires_client_certificate(self) -> bool:
        """Certificate mode only: the TLS handshake itself refuses a client without a certificate."""
        return self._settings["auth_modes"] == ["certificate"]

    def check_tls(self, settings: dict | None = None) -> None:
        """Refuse unusable TLS files, and certificate mode without TLS (at start and on every change)."""
        s = self._settings if settings is None else settings
        files = self.tls_files(s)
        if files is not None:
            files.check(SERVER)
        elif "certificate" in s["auth_modes"]:
            raise UsageError("certificate authentication needs the server's certificate, key and CA bundle",
                             hint="hvrctl server set --auth certificate --cert FILE --cert-key FILE --ca FILE")

    def key(self, principal: str) -> Key | None:
        return self._keys.get(principal)

    def reload_keys(self) -> None:
        self._keys = self.store.keys()

    def view(self) -> dict:
        s = self._settings
        return {
            "server_name": self.server_name,
            "enabled": s["enabled"],
            "auth_modes": s["auth_modes"],
            "listen": s.get("listen") or f"{self.listen[0]}:{self.listen[1]}",
            "listening_on": f"{self.bound[0]}:{self.bound[1]}" if self.bound else None,
            "default_storage": self.storage_dir(),
            "allow_any_authenticated": s["allow_any_authenticated"],
            "keys": len(self._keys),
            "tls": self._tls_view(),
        }

    def _tls_view(self) -> dict | None:
        files = self.tls_files()
        if files is None:
            return None
        return {"cert": str(files.cert), "cert_key": str(files.key), "ca": str(files.ca),
                "client_certificate": "required" if self.requires_client_certificate() else "optional"}

    def update(self, changes: dict) -> dict:
        """Validate every change first; apply all or nothing."""
        allowed = {"enabled", "auth_modes", "allow_any_authenticated", "default_storage", "listen", *TLS_SETTINGS}
        unknown = set(changes) - allowed
        if unknown:
            raise UsageError(f"unknown setting(s): {', '.join(sorted(unknown))}",
                             hint=f"settings are: {', '.join(sorted(allowed))}")
        for key in ("enabled", "allow_any_authenticated"):
            if key in changes and not isinstance(changes[key], bool):
                raise UsageError(f"setting {key!r} must be true or false")
        if "auth_modes" in changes:
            modes = changes["auth_modes"]
            if not isinstance(modes, list) or not modes or any(m not in AUTH_MODES for m in modes):
                raise UsageError(f"auth_modes must be a non-empty list of {', '.join(AUTH_MODES)}")
            if len(set(modes)) != len(modes):
                raise UsageError("auth_modes lists a mode twice")
        if "default_storage" in changes:
            check_storage_location("default_storage", changes["default_storage"])
        if "listen" in changes:
            try:
                host, port = parse_endpoint(changes["listen"]) if isinstance(changes["listen"], str) else (None, None)
            except ValueError as exc:
                raise UsageError(f"listen: {exc}") from None
            if host is None:
                raise UsageError("listen must be HOST:PORT")
        for key in TLS_SETTINGS:
            if key in changes and not (changes[key] == "" or isinstance(changes[key], str)
                                       and changes[key].startswith("/")):
                raise UsageError(f"{key} must be an absolute path (or empty: listener.toml's)")
        self.check_tls(dict(self._settings, **changes))
        self._settings = self.store.update_settings(changes)
        return self.view()
