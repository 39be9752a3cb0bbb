"""How a VM's writes are tracked between cuts: the two modes and the default.

* ``journal``: every write is appended to the disk's HRL log as well as the
  image (two writes per guest write); a cycle is the coalesced closed log,
  and every write is kept in order until it is shipped.
* ``bitmap``: a write only marks its 4 KiB blocks in the cycle's in-memory
  dirty map (after the durable write-intent marking of its region); the data
  is written once, into the image.  A cycle is the cut-time contents of its
  dirty blocks, read from the image or from the copy-before-write side file
  (docs/bitmap-tracking.md).
"""

from __future__ import annotations

from enum import StrEnum

from hvr_common.pure.errors import UsageError


class TrackingMode(StrEnum):
    JOURNAL = "journal"
    BITMAP = "bitmap"


# The mode of a VM added without --tracking: bitmap, from bench/churn.py and bench/nbd_fio.py
# (README "Tracking modes": fewer bytes written per guest byte, the lower RPO, the guest's writes at disk speed).
DEFAULT_TRACKING = TrackingMode.BITMAP


def parse_tracking(value: object, field: str = "tracking") -> TrackingMode:
    """The mode named by ``value`` (from a request body or the command line)."""
    if value is None:
        return DEFAULT_TRACKING
    try:
        return TrackingMode(value)
    except ValueError:
        raise UsageError(f"field {field!r} must be one of: " + ", ".join(m.value for m in TrackingMode),
                         hint="journal keeps every write in order; bitmap writes the data once") from None
