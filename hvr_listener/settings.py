"""Replica server settings (Get-/Set-VMReplicationServer) and the key cache.

Settings live in SQLite; this object keeps the current values and the
installed keys in memory for the request path and validates changes.
"""

from __future__ import annotations

from hvr_common.pure.config import parse_endpoint
from hvr_common.pure.errors import UsageError
from hvr_common.pure.monitoring import MonitoringSettings, monitoring_settings
from hvr_common.pure.token_auth import Key
from hvr_listener.store import ListenerStore

AUTH_MODES = ("token", "certificate")


class ServerSettings:
    def __init__(self, store: ListenerStore, server_name: str, listen: tuple[str, int], storage: str):
        self.store = store
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
            **self.monitoring().to_dict(),
        }

    def monitoring(self) -> MonitoringSettings:
        """The monitoring interval and its start time (Set-VMReplicationServer -MonitoringInterval)."""
        return monitoring_settings(self._settings)

    def update(self, changes: dict) -> dict:
        """Validate every change first; apply all or nothing."""
        allowed = {"enabled", "auth_modes", "allow_any_authenticated", "default_storage", "listen",
                   "monitoring_interval_s", "monitoring_start"}
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
            if "certificate" in modes:
                raise UsageError("certificate authentication is not available in this version",
                                 hint="use token authentication")
        if "default_storage" in changes:
            value = changes["default_storage"]
            if not isinstance(value, str) or not value.startswith("/"):
                raise UsageError("default_storage must be an absolute path")
        if "listen" in changes:
            try:
                host, port = parse_endpoint(changes["listen"]) if isinstance(changes["listen"], str) else (None, None)
            except ValueError as exc:
                raise UsageError(f"listen: {exc}") from None
            if host is None:
                raise UsageError("listen must be HOST:PORT")
        monitoring_settings({**self._settings, **changes})  # raises UsageError naming the setting
        self._settings = self.store.update_settings(changes)
        return self.view()
