"""How many of one caller's calls a server works on at once.

Each server caps the calls it runs at once for everyone
(``transmural.const.MAX_CONCURRENT_RPCS``); beyond that cap every caller
gets "busy". Without a share per caller, one caller could hold every slot
and everyone else would be turned away. The node gives each clinician and
each calling facility a share (``node.share``), the registry each node
(``registry.const.MAX_CALLS_PER_NODE``); a call over its share is refused at
once, saying why, and takes nothing from the others.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

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
