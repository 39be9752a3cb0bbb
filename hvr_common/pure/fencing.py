"""Fencing on the primary: what a refusal for a stale generation means and what the operator is told.

A replica that was failed over raised its relationship's generation (g -> g + 1).
From then on every upload, commit and heartbeat of generation g is refused with
409 ``stale_generation``: this host is no longer the VM's primary.  The agent
then stops the relationship (``Error``, or keeps ``PreparedForFailover`` when a
planned failover was prepared here), sends nothing more, deletes nothing, and
says so in one sentence (:func:`fenced_detail`).
"""

from __future__ import annotations

from hvr_common.pure.errors import ConflictError, HvrError

STALE_GENERATION = "stale_generation"
_OPENING = "VM {vm} was failed over at the replica server"


class FencedError(ConflictError):
    """The replica refused this host's generation: the VM was failed over there."""

    code = STALE_GENERATION


def fenced_detail(vm: str, there: int | None, here: int) -> str:
    shown = str(there) if there is not None else "a newer one"
    return (f"{_OPENING.format(vm=vm)} (generation {shown} there, {here} here): this host is no longer its "
            "primary; its writes since the last acknowledged cycle are kept. Stop it here; to make this host the "
            f"replica, run `hvrctl replica adopt {vm} --from-agent` here and `hvrctl vm set {vm} --reverse ...` on "
            "the new primary.")


def fenced_error(exc: HvrError, vm: str, here: int) -> FencedError | None:
    """The fencing error ``exc`` stands for (a refusal with code ``stale_generation``), or None."""
    if exc.code != STALE_GENERATION:
        return None
    there = exc.detail.get("generation") if isinstance(exc.detail, dict) else None
    if not isinstance(there, int) or isinstance(there, bool):
        there = None
    return FencedError(fenced_detail(vm, there, here), detail={"generation": there, "local_generation": here})


def is_fenced_detail(vm: str, detail: str | None) -> bool:
    """Whether a relationship's state detail says it was fenced (then nothing more is sent)."""
    return detail is not None and detail.startswith(_OPENING.format(vm=vm))
