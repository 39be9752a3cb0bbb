"""Failed authentications, limited per source address (a token bucket per address).

Each address may fail ``burst`` times at once; the allowance comes back at
``refill_per_s``.  While an address has no allowance left, every request from
it is refused before it is authenticated, with 429 ``auth_rate_limited``
and the seconds to wait (``detail.retry_after_s``), so a guessing attacker
gains nothing by going on.  Successful requests cost nothing.  The table is
bounded: an address whose allowance is full again is forgotten, and past
``max_addresses`` the address that failed longest ago is.

Pure: the time is passed in.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

from hvr_common.pure.wire.error_catalogue import error

DEFAULT_BURST = 10
DEFAULT_REFILL_PER_S = 1 / 6  # ten failures a minute, sustained
DEFAULT_MAX_ADDRESSES = 10_000


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at_s: float


class AuthFailureLimiter:
    def __init__(self, burst: int = DEFAULT_BURST, refill_per_s: float = DEFAULT_REFILL_PER_S,
                 max_addresses: int = DEFAULT_MAX_ADDRESSES):
        if burst < 1 or refill_per_s <= 0 or max_addresses < 1:
            raise ValueError("burst and max_addresses must be at least 1, refill_per_s above 0")
        self.burst = burst
        self.refill_per_s = refill_per_s
        self.max_addresses = max_addresses
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def _tokens(self, address: str, now_s: float) -> float:
        bucket = self._buckets.get(address)
        if bucket is None:
            return float(self.burst)
        tokens = min(float(self.burst), bucket.tokens + max(0.0, now_s - bucket.at_s) * self.refill_per_s)
        if tokens >= self.burst:
            del self._buckets[address]
        return tokens

    def retry_after_s(self, address: str, now_s: float) -> int:
        """0 if ``address`` may try now, else the whole seconds until it may."""
        tokens = self._tokens(address, now_s)
        return 0 if tokens >= 1 else math.ceil((1 - tokens) / self.refill_per_s)

    def check(self, address: str, now_s: float) -> None:
        """Raise 429 ``auth_rate_limited`` while ``address`` has no allowance left."""
        wait_s = self.retry_after_s(address, now_s)
        if wait_s:
            raise error("auth_rate_limited", f"too many failed authentications from {address}; "
                                             f"try again in {wait_s} s",
                        hint="check the primary's key or certificate; requests are refused until then",
                        detail={"retry_after_s": wait_s})

    def failed(self, address: str, now_s: float) -> None:
        """Count one failed authentication of ``address``."""
        tokens = self._tokens(address, now_s)
        self._buckets[address] = _Bucket(max(0.0, tokens - 1), now_s)
        self._buckets.move_to_end(address)
        while len(self._buckets) > self.max_addresses:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)
