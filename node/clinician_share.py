"""How many of one clinician's requests a node works on at once.

The gateway server caps the calls it runs at once for everyone
(``transmural.const.MAX_CONCURRENT_RPCS``); beyond that cap every caller
gets "node busy". Without a share per clinician, one script looping
searches (or one leaked token) could hold every slot, and every other
clinician of the facility would be turned away. So each clinician may have
at most MAX_REQUESTS_PER_CLINICIAN searches, reports and fetches running;
the next is refused at once, saying why, and takes nothing from the others.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from node import const
from transmural.errors import Overloaded


class ClinicianShare:
    """Counts each clinician's requests in progress; refuses one over the share."""

    def __init__(self, limit: int | None = None) -> None:
        self._limit = const.MAX_REQUESTS_PER_CLINICIAN if limit is None else limit
        self._running: dict[str, int] = {}

    @contextmanager
    def request(self, clinician_id: str) -> Iterator[None]:
        """Hold one of the clinician's places while the block runs; Overloaded if none is free."""
        running = self._running.get(clinician_id, 0)
        if running >= self._limit:
            raise Overloaded(
                f"you already have {running} requests running at this node, the most one "
                "clinician may have at once: wait for one to finish"
            )
        self._running[clinician_id] = running + 1
        try:
            yield
        finally:
            left = self._running[clinician_id] - 1
            if left:
                self._running[clinician_id] = left
            else:
                del self._running[clinician_id]

    def running(self, clinician_id: str) -> int:
        """The clinician's requests in progress now."""
        return self._running.get(clinician_id, 0)
