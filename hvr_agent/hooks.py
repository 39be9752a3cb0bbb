"""The failover lifecycle hooks of agent.toml ``[hooks]``: run one, or stop the step with ``hook_failed``.

The command runs without a shell (its placeholders replaced,
:class:`~hvr_common.pure.lifecycle_hooks.LifecycleHooks`), in its own process
group, killed with the group when it outlives ``hook_timeout_s``.  A hook that
is not configured is skipped.  A failure raises ``hook_failed`` naming the
hook, its exit status and the last lines of its output; the caller has
changed nothing yet for the step, so the operator can repeat or cancel it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hvr_common.pure.lifecycle_hooks import LifecycleHooks
from hvr_common.pure.wire.error_catalogue import error
from hvr_common.shell.logs import event
from hvr_agent.app_consistency import HookFailed, run_hook

log = logging.getLogger("hvr.agent.hooks")


class VmHooks:
    def __init__(self, hooks: LifecycleHooks, nbd_socket: Path):
        self.hooks = hooks
        self.nbd_socket = nbd_socket

    def configured(self, hook: str) -> bool:
        return bool(getattr(self.hooks, hook))

    async def run(self, hook: str, name: str, vm_id: str, export: str) -> None:
        argv = self.hooks.argv(hook, {"name": name, "vm_id": vm_id, "nbd_socket": str(self.nbd_socket),
                                      "export": export})
        if not argv:
            return
        try:
            took_s = await run_hook(argv, self.hooks.timeout_s, vm=name, phase=hook)
        except HookFailed as exc:
            event(log, "hook_failed", logging.ERROR, vm=name, hook=hook, error=str(exc))
            raise error("hook_failed", f"hook {hook} of VM {name} failed: {exc}",
                        hint=f"fix the command in agent.toml [hooks] {hook} (or what it drives), then repeat the "
                             "command, or cancel it", detail={"hook": hook}) from None
        event(log, "hook_ran", vm=name, hook=hook, latency_s=round(took_s, 3))
