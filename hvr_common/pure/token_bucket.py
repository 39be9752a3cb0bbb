"""The token bucket that paces uploads under a bandwidth cap (pure: the caller passes the time).

Tokens are bytes.  They accrue at ``rate`` bytes per second up to ``burst``
(what an idle link may send at once).  Taking more than there is puts the
bucket in debt, and :meth:`TokenBucket.take` answers how long the caller must
wait before sending: a piece larger than the burst is allowed, and the
average rate over any long span is the cap whatever the piece sizes.
Changing the rate keeps the debt (paid at the new rate) and clamps the saving
to the new burst.
"""

from __future__ import annotations

BURST_S = 0.1  # an idle bucket saves this many seconds' worth of bytes
MIN_BURST_BYTES = 64 * 1024


def burst_for(rate: int) -> float:
    return max(rate * BURST_S, MIN_BURST_BYTES)


class TokenBucket:
    """``rate`` bytes per second, at most ``burst`` saved; starts full at ``now_s``."""

    def __init__(self, rate: int, now_s: float):
        if rate <= 0:
            raise ValueError(f"rate must be positive, not {rate}")
        self.rate = rate
        self.burst = burst_for(rate)
        self.tokens = self.burst
        self.updated_s = now_s

    def _refill(self, now_s: float) -> None:
        elapsed = max(0.0, now_s - self.updated_s)  # a clock that steps back adds nothing
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        self.updated_s = max(self.updated_s, now_s)

    def take(self, nbytes: int, now_s: float) -> float:
        """Take ``nbytes``; the seconds to wait before sending them (0.0: send now)."""
        self._refill(now_s)
        self.tokens -= nbytes
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def set_rate(self, rate: int, now_s: float) -> None:
        """From ``now_s`` on, accrue at ``rate`` (what accrued before at the old one is kept)."""
        if rate <= 0:
            raise ValueError(f"rate must be positive, not {rate}")
        self._refill(now_s)
        self.rate = rate
        self.burst = burst_for(rate)
        self.tokens = min(self.tokens, self.burst)
