"""When the primary replicates: the cut clock, missed cycles, the initial schedule, retry backoff (pure).

Nothing here reads the clock: every rule takes ``now_ns`` and returns a value
or a decision; the agent's replication task acts on it.

* **Cut clock** (:class:`CutClock`): the next cut is one interval after the
  last one (or after the task started, or after a resume: intervals spent
  suspended are not missed cycles).  ``sync-now`` asks for a cut at once.
* **Missed cycles** (:meth:`CutClock.plan`): a cut that falls due while
  earlier cycles are still not acknowledged is skipped; every interval that
  passed that way counts as one missed cycle, and the clock moves past them
  to the first cut time after now.
* **Initial replication** (:func:`initial_due`, :func:`initial_wait_s`):
  ``hvrctl initial start --at TIME`` starts the copy at ``initial_at``; no
  time means "when the operator asks".
* **Backoff** (:class:`Backoff`): transient failures are retried after 1 s,
  doubling to 300 s, back to 1 s after any success.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

NS = 1_000_000_000
FREQUENCIES_S = (30, 300, 900)  # the replication intervals an operator may choose (Hyper-V's)
FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 300.0


@dataclass(frozen=True, slots=True)
class CutClock:
    """When the next cycle is cut, and whether ``sync-now`` asked for one now."""

    frequency_s: int
    next_cut_ns: int
    sync_requested: bool = False

    @classmethod
    def started(cls, frequency_s: int, now_ns: int) -> CutClock:
        """The clock of a task that starts now: the first cut one interval later."""
        return cls(frequency_s, now_ns + frequency_s * NS)

    def due(self, now_ns: int) -> bool:
        return now_ns >= self.next_cut_ns

    def wants_cut(self, now_ns: int) -> bool:
        """A cut is asked for (sync-now) or due."""
        return self.sync_requested or self.due(now_ns)

    def seconds_to_cut(self, now_ns: int) -> float:
        """Seconds until the next cut is due (negative once it is overdue)."""
        return (self.next_cut_ns - now_ns) / NS

    def wait_s(self, now_ns: int) -> float:
        """How long an idle task sleeps before the next cut: never negative."""
        return max(0.0, self.seconds_to_cut(now_ns))

    def with_sync_requested(self) -> CutClock:
        return replace(self, sync_requested=True)

    def cut_begun(self) -> CutClock:
        """A cut begins: the sync-now request is answered by it (one made during the cut asks for another)."""
        return replace(self, sync_requested=False)

    def cut_made(self, now_ns: int) -> CutClock:
        """A cut was made at ``now_ns``: the next is one interval later (a pending sync-now request stays)."""
        return replace(self, next_cut_ns=now_ns + self.frequency_s * NS)

    def restarted(self, now_ns: int) -> CutClock:
        """After a suspension: the next cut is one interval from now; no interval spent suspended is missed."""
        return replace(self, next_cut_ns=now_ns + self.frequency_s * NS)

    def plan(self, now_ns: int, pending: bool) -> CyclePlan:
        """What a replication step does now, given whether closed cycles wait unacknowledged.

        A due cut with cycles pending is skipped: each cut time up to ``now_ns``
        is a missed cycle and the clock moves to the first cut time after now.
        A cut happens when sync-now asked for one, or when it is due and
        nothing is pending.
        """
        missed: list[int] = []
        clock = self
        if pending and self.due(now_ns):
            at = self.next_cut_ns
            step = self.frequency_s * NS
            while at <= now_ns:
                missed.append(at)
                at += step
            clock = replace(self, next_cut_ns=at)
        cut = clock.sync_requested or (clock.due(now_ns) and not pending)
        return CyclePlan(tuple(missed), cut, clock)


@dataclass(frozen=True, slots=True)
class CyclePlan:
    missed_ns: tuple[int, ...]  # the cut times skipped because earlier cycles were not acknowledged
    cut: bool  # cut now
    clock: CutClock  # the clock once the missed intervals are counted


def initial_due(initial_at_ns: int | None, now_ns: int) -> bool:
    """A scheduled initial replication starts once its time has come; an unscheduled one waits for the operator."""
    return initial_at_ns is not None and now_ns >= initial_at_ns


def initial_wait_s(initial_at_ns: int | None, now_ns: int) -> float | None:
    """Seconds until a scheduled initial replication starts (0 if due); None: wait until woken."""
    if initial_at_ns is None:
        return None
    return max(0.0, (initial_at_ns - now_ns) / NS)


def initial_is_later(at_ns: int | None, now_ns: int) -> bool:
    """``initial start --at``: a time still ahead schedules the copy, anything else starts it now."""
    return at_ns is not None and at_ns > now_ns


class Backoff:
    """The delay before the next retry of a transient failure: 1 s, doubling to 300 s, reset by a success."""

    __slots__ = ("delay_s",)

    def __init__(self) -> None:
        self.delay_s = FIRST_BACKOFF_S

    def reset(self) -> None:
        self.delay_s = FIRST_BACKOFF_S

    def grow(self) -> None:
        self.delay_s = min(self.delay_s * 2, MAX_BACKOFF_S)
