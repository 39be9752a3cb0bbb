"""What the streaming decoders (HRL logs, bundles, undo logs) share.

:data:`NEED_DATA` is the one "need more data" sentinel of the codecs: a
decoder's ``next_event`` answers it when it has used up what it was fed.
:class:`BorrowingDecoder` is the discipline of parsing fed bytes where they
are, without a copy, and letting go of them whenever the caller may reuse
them.
"""

from __future__ import annotations

import enum


class DecoderSignal(enum.Enum):
    NEED_DATA = "need_data"


NEED_DATA = DecoderSignal.NEED_DATA


class BorrowingDecoder:
    """What the log and bundle decoders share: parsing fed bytes where they are.

    A subclass keeps the last fed ``bytes``/``memoryview`` while ``_borrowed``
    and implements ``_event`` (the next event) and ``_unborrow`` (copy what is
    left of the fed piece into its own buffer).  :meth:`next_event` lets go of
    the piece whenever the caller may reuse it: NEED_DATA, an event for which
    ``_lets_go`` is true, or an error.
    """

    _borrowed: bool

    def _event(self):
        raise NotImplementedError

    def _unborrow(self) -> None:
        raise NotImplementedError

    def _lets_go(self, ev) -> bool:
        return ev is NEED_DATA

    def next_event(self):
        try:
            ev = self._event()
        except BaseException:
            if self._borrowed:  # a dead decoder keeps nothing of the caller's
                self._unborrow()
            raise
        if self._borrowed and self._lets_go(ev):
            self._unborrow()
        return ev
