"""``[hooks]`` of agent.toml: the commands that stop, define, start and undefine a VM during a failover.

Each is an argv list run without a shell; in every argument ``{name}`` (the VM's
name), ``{vm_id}``, ``{nbd_socket}`` (the agent's NBD unix socket) and
``{export}`` (the export of the VM's first disk, ``NAME/DISK``) are replaced.
A hook that exits non-zero or outlives ``hook_timeout_s`` (default 120 s) stops
the failover step that ran it (``hook_failed``).  When they run
(docs/failover.md): ``failover prepare`` runs ``stop_vm``; serving a failed-over
VM runs ``define_vm`` then ``start_vm``; withdrawing it runs ``stop_vm`` then
``undefine_vm``.  A hook that is not configured is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

HOOK_NAMES = ("stop_vm", "define_vm", "start_vm", "undefine_vm")
DEFAULT_HOOK_TIMEOUT_S = 120
MAX_HOOK_TIMEOUT_S = 3600
PLACEHOLDERS = ("name", "vm_id", "nbd_socket", "export")


@dataclass(frozen=True)
class LifecycleHooks:
    stop_vm: tuple[str, ...] = ()
    define_vm: tuple[str, ...] = ()
    start_vm: tuple[str, ...] = ()
    undefine_vm: tuple[str, ...] = ()
    timeout_s: int = DEFAULT_HOOK_TIMEOUT_S

    def argv(self, hook: str, values: dict[str, str]) -> list[str]:
        """The command of ``hook`` with its placeholders replaced ([] when it is not configured)."""
        out = []
        for arg in getattr(self, hook):
            for key in PLACEHOLDERS:
                arg = arg.replace("{" + key + "}", values.get(key, ""))
            out.append(arg)
        return out


def parse_lifecycle_hooks(table, problems: list[str]) -> LifecycleHooks:
    if table is None:
        return LifecycleHooks()
    if not isinstance(table, dict):
        problems.append("hooks: must be a table")
        return LifecycleHooks()
    found: dict = {}
    for key in HOOK_NAMES:
        value = table.get(key)
        if value is None:
            continue
        if not isinstance(value, list) or not value or not all(isinstance(a, str) and a for a in value):
            problems.append(f"hooks.{key}: must be a non-empty list of strings (the command and its arguments; "
                            f"{', '.join('{' + p + '}' for p in PLACEHOLDERS)} are replaced), not {value!r}")
            continue
        found[key] = tuple(value)
    timeout = table.get("hook_timeout_s", DEFAULT_HOOK_TIMEOUT_S)
    if not isinstance(timeout, int) or isinstance(timeout, bool) or not 1 <= timeout <= MAX_HOOK_TIMEOUT_S:
        problems.append(f"hooks.hook_timeout_s: must be whole seconds from 1 to {MAX_HOOK_TIMEOUT_S}, "
                        f"not {timeout!r}")
        timeout = DEFAULT_HOOK_TIMEOUT_S
    for key in sorted(set(table) - set(HOOK_NAMES) - {"hook_timeout_s"}):
        problems.append(f"hooks.{key}: unknown key")
    return LifecycleHooks(**found, timeout_s=timeout)
