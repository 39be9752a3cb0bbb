"""Configuration schemas: TOML tables in, frozen validated objects out.

Pure: the daemons read the file and hand the parsed table to ``parse_*``.
Unknown keys are errors; every problem is reported at once, each naming its
key; nothing is half-applied.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from hvr_common.pure.log_backlog import DEFAULT_BUDGET_PERCENT, check_budget_percent
from hvr_common.pure.resync_window import ResyncConfig, parse_resync
from hvr_common.pure.lifecycle_hooks import LifecycleHooks, parse_lifecycle_hooks
from hvr_common.pure.errors import ConfigError
from hvr_common.pure.names import storage_location_problem
from hvr_common.pure.intent_bitmap import DEFAULT_REGION_BYTES, validate_region_bytes
from hvr_common.pure.transfer_settings import TransferSettings, check_parallelism, parse_transfer_config
from hvr_common.pure.failover import DEFAULT_PRIMARY_ALIVE_S

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "json", "text")


class _Checker:
    """Collects problems while reading keys of one table."""

    def __init__(self, table: dict, source: str):
        self.table = table
        self.source = source
        self.problems: list[str] = []
        self.seen: set[str] = set()

    def _get(self, key: str, required: bool, default):
        self.seen.add(key)
        if key not in self.table:
            if required:
                self.problems.append(f"{key}: required key is missing")
            return default, False
        return self.table[key], True

    def path(self, key: str, *, required: bool = False, default: str | None = None) -> Path | None:
        value, present = self._get(key, required, default)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            self.problems.append(f"{key}: must be a non-empty string path, not {value!r}")
            return None
        p = Path(value)
        if not p.is_absolute():
            self.problems.append(f"{key}: must be an absolute path, not {value!r}")
            return None
        problem = storage_location_problem(value)  # NUL, control characters, '..', length
        if problem is not None:
            self.problems.append(f"{key}: {problem}, not {value!r:.100}")
            return None
        return p

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value, _ = self._get(key, False, default)
        if value not in choices:
            self.problems.append(f"{key}: must be one of {', '.join(choices)}, not {value!r}")
            return default
        return value

    def integer(self, key: str, default: int, *, check=None) -> int:
        value, _ = self._get(key, False, default)
        if not isinstance(value, int) or isinstance(value, bool):
            self.problems.append(f"{key}: must be an integer, not {value!r}")
            return default
        if check is not None:
            try:
                check(value)
            except ValueError as exc:
                self.problems.append(f"{key}: {exc}")
                return default
        return value

    def endpoint(self, key: str, default: str = "") -> tuple[str, int] | None:
        value, _ = self._get(key, False, default)
        if value in ("", None):
            return None
        if not isinstance(value, str):
            self.problems.append(f"{key}: must be a string HOST:PORT, not {value!r}")
            return None
        try:
            return parse_endpoint(value)
        except ValueError as exc:
            self.problems.append(f"{key}: {exc}")
            return None

    def group(self, key: str) -> str | None:
        value, present = self._get(key, False, None)
        if not present:
            return None
        if not isinstance(value, str) or not value:
            self.problems.append(f"{key}: must be a group name, not {value!r}")
            return None
        try:
            import grp
            grp.getgrnam(value)
        except KeyError:
            self.problems.append(f"{key}: no group named {value!r} on this host")
            return None
        return value

    def finish(self) -> None:
        for key in sorted(set(self.table) - self.seen):
            self.problems.append(f"{key}: unknown key")
        if self.problems:
            raise ConfigError(f"{self.source}: {len(self.problems)} problem(s) in configuration",
                              problems=self.problems)


def parse_endpoint(value: str) -> tuple[str, int]:
    host, sep, port_s = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{value!r} is not HOST:PORT")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ValueError(f"{host!r} is not an IP address or localhost") from None
    if re.fullmatch("[0-9]{1,5}", port_s) is None or not 0 <= int(port_s) <= 65535:  # ASCII digits only
        raise ValueError(f"port {port_s!r:.80} is not a number from 0 to 65535")
    return host, int(port_s)


def _region_check(v: int) -> None:
    validate_region_bytes(v)


def _positive(v: int) -> None:
    if v <= 0:
        raise ValueError(f"must be positive, not {v}")


DEFAULT_INITIAL_WINDOW_BYTES = 20 * 1024 * 1024
MIN_INITIAL_WINDOW_BYTES = 1024 * 1024
MAX_INITIAL_WINDOW_BYTES = 256 * 1024 * 1024


def _initial_window_check(v: int) -> None:
    if not MIN_INITIAL_WINDOW_BYTES <= v <= MAX_INITIAL_WINDOW_BYTES:
        raise ValueError(f"must be from {MIN_INITIAL_WINDOW_BYTES} to {MAX_INITIAL_WINDOW_BYTES} bytes, not {v}")


DEFAULT_HOOK_TIMEOUT_S = 60
MAX_HOOK_TIMEOUT_S = 3600


@dataclass(frozen=True)
class FreezeHooks:
    """The commands that freeze and thaw a VM's guest file systems around an application-consistent cut.

    Each is an argv list; ``{vm}`` in an argument is replaced by the VM's name.
    """

    freeze: tuple[str, ...]
    thaw: tuple[str, ...]
    timeout_s: int = DEFAULT_HOOK_TIMEOUT_S

    def argv(self, which: str, vm: str) -> list[str]:
        return [arg.replace("{vm}", vm) for arg in getattr(self, which)]


@dataclass(frozen=True)
class AppConsistencyConfig:
    """``[app_consistency]``: default hooks, and ``[app_consistency.vm.NAME]`` for one VM."""

    default: FreezeHooks | None = None
    per_vm: tuple[tuple[str, FreezeHooks], ...] = ()

    def hooks_for(self, vm: str) -> FreezeHooks | None:
        for name, hooks in self.per_vm:
            if name == vm:
                return hooks
        return self.default


def _parse_hooks(table, where: str, problems: list[str]) -> FreezeHooks | None:
    if not isinstance(table, dict):
        problems.append(f"{where}: must be a table")
        return None
    argvs = {}
    for key in ("freeze", "thaw"):
        value = table.get(key)
        if (not isinstance(value, list) or not value
                or not all(isinstance(a, str) and a for a in value)):
            problems.append(f"{where}.{key}: must be a non-empty list of strings (the command and its "
                            f"arguments; {{vm}} is replaced by the VM name), not {value!r}")
        else:
            argvs[key] = tuple(value)
    timeout = table.get("timeout_s", DEFAULT_HOOK_TIMEOUT_S)
    if not isinstance(timeout, int) or isinstance(timeout, bool) or not 1 <= timeout <= MAX_HOOK_TIMEOUT_S:
        problems.append(f"{where}.timeout_s: must be whole seconds from 1 to {MAX_HOOK_TIMEOUT_S}, not {timeout!r}")
        timeout = DEFAULT_HOOK_TIMEOUT_S
    for key in sorted(set(table) - {"freeze", "thaw", "timeout_s", "vm"}):
        problems.append(f"{where}.{key}: unknown key")
    if len(argvs) < 2:
        return None
    return FreezeHooks(argvs["freeze"], argvs["thaw"], timeout)


def parse_app_consistency(table, problems: list[str]) -> AppConsistencyConfig:
    if table is None:
        return AppConsistencyConfig()
    if not isinstance(table, dict):
        problems.append("app_consistency: must be a table")
        return AppConsistencyConfig()
    default = None
    if set(table) - {"vm"}:
        default = _parse_hooks(table, "app_consistency", problems)
    per_vm = []
    vms = table.get("vm", {})
    if not isinstance(vms, dict):
        problems.append("app_consistency.vm: must be a table of VM names")
        vms = {}
    for name, sub in vms.items():
        if isinstance(sub, dict) and "vm" in sub:
            problems.append(f"app_consistency.vm.{name}.vm: unknown key")
        hooks = _parse_hooks(sub, f"app_consistency.vm.{name}", problems)
        if hooks is not None:
            per_vm.append((name, hooks))
    return AppConsistencyConfig(default, tuple(per_vm))


@dataclass(frozen=True)
class AgentConfig:
    state_dir: Path
    admin_socket: Path
    nbd_socket: Path
    nbd_tcp: tuple[str, int] | None = None
    log_level: str = "info"
    log_format: str = "auto"
    bitmap_region_bytes: int = DEFAULT_REGION_BYTES
    journal_buffer_bytes: int = 1024 * 1024
    initial_window_bytes: int = DEFAULT_INITIAL_WINDOW_BYTES
    nbd_socket_group: str | None = None
    app_consistency: AppConsistencyConfig = AppConsistencyConfig()
    transfers: TransferSettings = TransferSettings()  # [bandwidth], max_active_transfers
    http_listen: tuple[str, int] | None = None  # /healthz, /readyz, /metrics; off unless set
    cbw_budget_bytes: int = 4 * 1024 * 1024 * 1024  # bitmap tracking: copies of one cycle's blocks, per disk
    cbw_max_age_s: int = 900  # bitmap tracking: how long a cycle may keep copy-before-write armed
    resync: ResyncConfig = ResyncConfig()  # [resync]: the automatic resync window (resync_window.py)
    heartbeat_s: int = 10  # failover: how often each relationship tells the replica whether the VM runs
    hooks: LifecycleHooks = LifecycleHooks()  # [hooks]: failover lifecycle commands (lifecycle_hooks.py)
    # journal mode: the logs not yet shipped may hold this share of the VM's disks' size, then the VM
    # switches to bitmap tracking until they are shipped (log_backlog.py)
    log_budget_percent: int = DEFAULT_BUDGET_PERCENT

    @property
    def db_path(self) -> Path:
        return self.state_dir / "agent.db"

    @property
    def outbox_dir(self) -> Path:
        """Spool files of bundles waiting to be uploaded, one folder per VM."""
        return self.state_dir / "outbox"


def parse_agent_config(table: dict, source: str = "agent config") -> AgentConfig:
    c = _Checker(table, source)
    cfg = dict(
        state_dir=c.path("state_dir", required=True),
        admin_socket=c.path("admin_socket", required=True),
        nbd_socket=c.path("nbd_socket", required=True),
        nbd_tcp=c.endpoint("nbd_tcp"),
        log_level=c.choice("log_level", LOG_LEVELS, "info"),
        log_format=c.choice("log_format", LOG_FORMATS, "auto"),
        bitmap_region_bytes=c.integer("bitmap_region_bytes", DEFAULT_REGION_BYTES, check=_region_check),
        journal_buffer_bytes=c.integer("journal_buffer_bytes", 1024 * 1024, check=_positive),
        nbd_socket_group=c.group("nbd_socket_group"),
        initial_window_bytes=c.integer("initial_window_bytes", DEFAULT_INITIAL_WINDOW_BYTES,
                                       check=_initial_window_check),
        http_listen=c.endpoint("http_listen"),
        cbw_budget_bytes=c.integer("cbw_budget_bytes", 4 * 1024 * 1024 * 1024, check=_positive),
        cbw_max_age_s=c.integer("cbw_max_age_s", 900, check=_positive),
        heartbeat_s=c.integer("heartbeat_s", 10, check=_positive),
        log_budget_percent=c.integer("log_budget_percent", DEFAULT_BUDGET_PERCENT, check=check_budget_percent),
    )
    c.seen.add("hooks")
    cfg["hooks"] = parse_lifecycle_hooks(table.get("hooks"), c.problems)
    c.seen.add("app_consistency")
    cfg["app_consistency"] = parse_app_consistency(table.get("app_consistency"), c.problems)
    c.seen.update(("bandwidth", "max_active_transfers"))
    cfg["transfers"] = parse_transfer_config(table, c.problems)
    c.seen.add("resync")
    cfg["resync"] = parse_resync(table.get("resync"), c.problems)
    c.finish()
    return AgentConfig(**cfg)


DEFAULT_MAX_ACTIVE_APPLIES = 1
MAX_ACTIVE_APPLIES = 64


@dataclass(frozen=True)
class ListenerConfig:
    state_dir: Path
    admin_socket: Path
    listen: tuple[str, int]
    storage: Path
    server_name: str = ""
    log_level: str = "info"
    log_format: str = "auto"
    max_bundle_bytes: int = 64 * 1024 * 1024 * 1024
    nbd_socket: Path | None = None  # test failover views are served here (nbd+unix://)
    # TLS 1.3 of the replication API (docs/security.md): all three, or none (plain HTTP)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    max_active_applies: int = DEFAULT_MAX_ACTIVE_APPLIES  # replicas applying cycles at once
    http_listen: tuple[str, int] | None = None  # /healthz, /readyz, /metrics; off unless set
    primary_alive_s: int = DEFAULT_PRIMARY_ALIVE_S  # failover's split-brain guard (hvr_common.pure.failover)

    @property
    def db_path(self) -> Path:
        return self.state_dir / "listener.db"


def parse_listener_config(table: dict, source: str = "listener config") -> ListenerConfig:
    c = _Checker(table, source)
    listen = c.endpoint("listen", "")
    if listen is None and "listen" in table and not any(p.startswith("listen:") for p in c.problems):
        c.problems.append("listen: required, as HOST:PORT")
    elif "listen" not in table:
        c.problems.append("listen: required key is missing")
    name = table.get("server_name", "")
    c.seen.add("server_name")
    if not isinstance(name, str):
        c.problems.append(f"server_name: must be a string, not {name!r}")
        name = ""
    cfg = dict(
        state_dir=c.path("state_dir", required=True),
        admin_socket=c.path("admin_socket", required=True),
        listen=listen,
        storage=c.path("storage", required=True),
        server_name=name,
        log_level=c.choice("log_level", LOG_LEVELS, "info"),
        log_format=c.choice("log_format", LOG_FORMATS, "auto"),
        max_bundle_bytes=c.integer("max_bundle_bytes", 64 * 1024 * 1024 * 1024, check=_positive),
        nbd_socket=c.path("nbd_socket"),
        tls_cert=c.path("tls_cert"),
        tls_key=c.path("tls_key"),
        tls_ca=c.path("tls_ca"),
        http_listen=c.endpoint("http_listen"),
        primary_alive_s=c.integer("primary_alive_s", DEFAULT_PRIMARY_ALIVE_S, check=_positive),
    )
    tls = [cfg[k] is not None for k in ("tls_cert", "tls_key", "tls_ca")]
    if any(tls) and not all(tls) and not any(p.startswith("tls_") for p in c.problems):
        c.problems.append("tls_cert, tls_key, tls_ca: give all three, or none (plain HTTP)")
    c.seen.add("max_active_applies")
    applies = check_parallelism(table.get("max_active_applies", DEFAULT_MAX_ACTIVE_APPLIES), "max_active_applies",
                                c.problems, MAX_ACTIVE_APPLIES)
    cfg["max_active_applies"] = applies or DEFAULT_MAX_ACTIVE_APPLIES
    c.finish()
    return ListenerConfig(**cfg)
