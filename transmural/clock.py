"""The one clock every component takes, so tests can move time themselves."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch (wall clock, for timestamps)."""
        ...

    def monotonic(self) -> float:
        """Seconds on a monotonic clock (for deadlines and durations)."""
        ...


class SystemClock:
    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


def utc_iso(epoch_seconds: float) -> str:
    """ISO 8601 UTC timestamp with seconds precision."""
    return datetime.fromtimestamp(epoch_seconds, UTC).isoformat(timespec="seconds")
