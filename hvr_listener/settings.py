"""Replica server settings (Get-/Set-VMReplicationServer), the key cache and the authorization decision.

Settings, keys and authorization entries live in SQLite; this object keeps
them in memory for the request path (reloaded after every change, so a change
takes effect on the next request) and validates changes.
``max_active_applies`` (replicas applying cycles at once) defaults to
listener.toml's value; once set here it is stored and wins over the file.
"""

from __future__ import annotations

from pathlib import Path

from hvr_common.pure.authorization import AuthorizationEntry, Grant, authorize, check_storage
from hvr_common.pure.config import parse_endpoint
from hvr_common.pure.errors import HvrError, UsageError
from hvr_common.pure.names import check_storage_location
from hvr_common.pure.monitoring import MonitoringSettings, monitoring_settings
from hvr_common.pure.token_auth import Key
from hvr_common.shell.certificate_files import SERVER, TlsFiles, chains_to, check_ca_bundle
from hvr_common.pure.config import DEFAULT_MAX_ACTIVE_APPLIES, MAX_ACTIVE_APPLIES
from hvr_common.pure.transfer_settings import check_parallelism
from hvr_common.shell.concurrency_limit import ConcurrencyLimit
from hvr_listener.store import ListenerStore

AUTH_MODES = ("token", "certificate")
TLS_SETTINGS = ("tls_cert", "tls_key", "tls_ca")  # set with hvrctl server set --cert --cert-key --ca
MAX_CHECKED_CERTIFICATES = 256  # client certificates whose chain to the CA bundle is remembered


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
                 tls: TlsFiles | None = None, max_active_applies: int = DEFAULT_MAX_ACTIVE_APPLIES):
        self.store = store
        self.configured_tls = tls  # listener.toml's; the stored settings (server set --cert ...) take precedence
        self.configured_applies = max_active_applies
        self.server_name = server_name
        self.listen = listen
        self.storage = storage
        self._settings = store.settings()
        self.bound: tuple[str, int] | None = None  # where the replication API really listens
        self._keys = store.principal_keys()
        self._entries = store.authorization_entries()
        self.applies = ConcurrencyLimit(self.max_active_applies())  # the applier holds a place per replica
        self._trust = self._load_trust()

    def _load_trust(self) -> tuple[list, dict]:
        """The CA bundle in force and a cache of the client certificates checked against it (swapped whole)."""
        try:
            files = self.tls_files()
            return (check_ca_bundle(files.ca) if files is not None else []), {}
        except HvrError:  # unusable files: check_tls refuses them; meanwhile no certificate is trusted
            return [], {}

    def certificate_trusted(self, transport) -> bool:
        """Whether the connection's client certificate, verified by its handshake, still chains to the CA bundle
        in force, in certificate mode (a trusted CA removed: refused on the next request)."""
        der = _client_certificate(transport)
        if der is None or "certificate" not in self._settings["auth_modes"]:
            return False
        bundle, checked = self._trust
        if der not in checked:
            if len(checked) >= MAX_CHECKED_CERTIFICATES:
                checked.clear()
            checked[der] = chains_to(der, bundle)
        return checked[der]

    def max_active_applies(self) -> int:
        return self._settings.get("max_active_applies") or self.configured_applies

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

    def key(self, principal: str) -> tuple[Key, ...]:
        """The principal's installed keys (none: unknown)."""
        return self._keys.get(principal, ())

    def reload_keys(self) -> None:
        self._keys = self.store.principal_keys()

    def entries(self) -> list[AuthorizationEntry]:
        return list(self._entries)

    def reload_entries(self) -> None:
        self._entries = self.store.authorization_entries()

    def still_allowed(self, principal: str, _transport=None) -> bool:
        """Whether ``principal`` still has a key and is still authorised (open connections of one that is
        not are closed: :meth:`hvr_listener.peer_connections.PeerConnections.close_revoked`)."""
        if not self._settings["enabled"]:
            return False
        if not self.key(principal) and not self.certificate_trusted(_transport):
            return False
        try:
            self.grant(principal)
        except HvrError:
            return False
        return True

    def grant(self, principal: str) -> Grant:
        """What an authenticated ``principal`` may do here, or 403 ``not_authorized``."""
        return authorize(principal, allow_any=self._settings["allow_any_authenticated"],
                         default_storage=self.storage_dir(), entries=self._entries)

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
            "keys": sum(len(keys) for keys in self._keys.values()),
            "authorization_entries": len(self._entries),
            "tls": self._tls_view(),
            "max_active_applies": self.max_active_applies(),
            "active_applies": self.applies.active,
            **self.monitoring().to_dict(),
        }

    def _tls_view(self) -> dict | None:
        files = self.tls_files()
        if files is None:
            return None
        return {"cert": str(files.cert), "cert_key": str(files.key), "ca": str(files.ca),
                "client_certificate": "required" if self.requires_client_certificate() else "optional"}


    def monitoring(self) -> MonitoringSettings:
        """The monitoring interval and its start time (Set-VMReplicationServer -MonitoringInterval)."""
        return monitoring_settings(self._settings)

    def update(self, changes: dict) -> dict:
        """Validate every change first; apply all or nothing."""
        allowed = {"enabled", "auth_modes", "allow_any_authenticated", "default_storage", "listen",
                   "max_active_applies", "monitoring_interval_s", "monitoring_start", "latency_limit_s",
                   *TLS_SETTINGS}
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
            try:
                check_storage(changes["default_storage"])
            except UsageError as exc:
                raise UsageError(f"default_storage: {exc.message}", hint=exc.hint) from None
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
        if "max_active_applies" in changes:
            problems: list[str] = []
            check_parallelism(changes["max_active_applies"], "max_active_applies", problems, MAX_ACTIVE_APPLIES)
            if problems:
                raise UsageError(problems[0])
        monitoring_settings({**self._settings, **changes})  # raises UsageError naming the setting
        self._settings = self.store.update_settings(changes)
        self._trust = self._load_trust()
        return self.view()

    def apply_limits(self) -> None:
        """On the event loop, after :meth:`update`: the new limit of parallel applies takes effect."""
        self.applies.set_limit(self.max_active_applies())


def _client_certificate(transport) -> bytes | None:
    """The client certificate (DER) the connection's TLS handshake verified, if any."""
    tls = transport.get_extra_info("ssl_object") if transport is not None else None
    return tls.getpeercert(binary_form=True) if tls is not None else None
