"""How many of one caller's requests a node works on at once.

Each server caps the calls it runs at once for everyone
(``transmural.const.MAX_CONCURRENT_RPCS``); beyond that cap every caller
gets "node busy". Without a share per caller, one caller could hold every
slot and everyone else would be turned away: one clinician's script looping
searches (or a leaked token) at the gateway port, or one facility at the
peer port whose gateway is misbehaving, or hostile. So each caller has a
share (``clinician_share``, ``facility_share``); a request over it is
refused at once, saying why, and takes nothing from the others.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from node import const
from transmural.errors import Overloaded


class Share:
    """Counts each caller's requests in progress; refuses one over the share."""

    def __init__(self, limit: int, refusal: Callable[[int], str]) -> None:
        self._limit = limit
        self._refusal = refusal
        self._running: dict[str, int] = {}

    @contextmanager
    def request(self, caller: str) -> Iterator[None]:
        """Hold one of the caller's places while the block runs; Overloaded if none is free."""
        running = self._running.get(caller, 0)
        if running >= self._limit:
            raise Overloaded(self._refusal(running))
        self._running[caller] = running + 1
        try:
            yield
        finally:
            left = self._running[caller] - 1
            if left:
                self._running[caller] = left
            else:
                del self._running[caller]

    def running(self, caller: str) -> int:
        """The caller's requests in progress now."""
        return self._running.get(caller, 0)


def clinician_share(limit: int | None = None) -> Share:
    """Each clinician's share of the gateway port (MAX_REQUESTS_PER_CLINICIAN)."""
    return Share(
        const.MAX_REQUESTS_PER_CLINICIAN if limit is None else limit,
        lambda running: (
            f"you already have {running} requests running at this node, the most one "
            "clinician may have at once: wait for one to finish"
        ),
    )


def facility_share(limit: int | None = None) -> Share:
    """Each calling facility's share of the peer port (MAX_CALLS_PER_FACILITY)."""
    return Share(
        const.MAX_CALLS_PER_FACILITY if limit is None else limit,
        lambda running: (
            f"busy: this facility is already answering {running} "
            f"call{'' if running == 1 else 's'} from yours, the most "
            "it takes from one facility at once; try again shortly"
        ),
    )
