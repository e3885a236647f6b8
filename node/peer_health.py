"""Which peers are failing, and when this node asks them again.

A facility that is down or hangs must not cost every search a connection
attempt or a full deadline. After a transport failure (the peer could not
be reached, or did not answer before the deadline) the peer *backs off*:
until its window ends it is not asked, and each question gets at once the
last failure's status with a message saying when it will be retried. The
first question after the window is let through as the *probe*; while it is
on its way every other question still gets the fast answer. An answer from
the peer ends the back-off; a failed probe doubles the window, from
FIRST_BACKOFF_S up to MAX_BACKOFF_S, each shortened by up to BACKOFF_JITTER
at random so that the nodes of a network do not all retry a recovering
peer in the same instant.

Failures are counted per back-off round, not per call: a burst of searches
that were all on their way when the peer failed doubles the window once.
The back-off is shared by every clinician of the node, so a timeout under a
deadline shorter than SHORTEST_JUDGED_DEADLINE_S does not count: it says
more about the deadline one clinician chose than about the peer.

While a peer backs off, it is also health-checked in the background about
every CHECK_EVERY_S (``checked``), so that a facility restarted on its old
address is asked again within a second or two instead of at the end of a
window of up to MAX_BACKOFF_S. A check that finds the peer serving ends the
window early: the next question is let through as the probe, and its answer
decides, as at the end of any window (the failures in a row are kept, so a
peer that still fails backs off for twice as long). It ends the window only
if the peer was seen *not* serving since its last failure (or that failure
was not reaching it at all): a peer that answers health checks all along
while its calls hang would otherwise cost a full deadline every check.

Nothing here knows about gRPC; ``node.peer_link`` decides what counts as a
transport failure, holds the channels and runs the checks.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from datetime import UTC, datetime

from node.answers import Status
from transmural.clock import Clock

#: Back-off window after the first failure in a row, and its longest. The cap
#: bounds how long a recovered peer can look dead when nothing else notices.
FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 8.0
#: Each window is shortened by a random part of up to this fraction.
BACKOFF_JITTER = 0.2
#: A timeout under a shorter deadline than this does not start a back-off.
SHORTEST_JUDGED_DEADLINE_S = 1.0
#: A backing-off peer is health-checked this often (jittered like the window).
CHECK_EVERY_S = 1.0


@dataclass(frozen=True, slots=True)
class Attempt:
    """Leave to ask a peer now; hand it back to ``answered``, ``failed`` or ``abandoned``.

    ``round`` is how many failures in a row the peer had when this was
    given, so a late failure of an older call does not double the window
    again; ``probe`` says this call tests a peer that was backing off.
    """

    peer: Hashable
    round: int
    probe: bool


@dataclass(frozen=True, slots=True)
class NotAsked:
    """The answer to give instead of asking a backing-off peer."""

    status: Status
    message: str
    retry_in_s: float


@dataclass(slots=True)
class _Trouble:
    failures: int
    status: Status
    what: str
    retry_at: float  # on the monotonic clock
    seen_down: bool  # a check found it not serving, or the failure was not reaching it
    probing: bool = False


class PeerHealth:
    """Each peer's failures in a row, and whether to ask it now (see module doc)."""

    def __init__(
        self,
        clock: Clock,
        first_s: float | None = None,
        max_s: float | None = None,
        jitter: float | None = None,
        shortest_judged_s: float | None = None,
        check_every_s: float | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        # Read at construction (not as default values) so tests can shrink them.
        self._first_s = FIRST_BACKOFF_S if first_s is None else first_s
        self._max_s = MAX_BACKOFF_S if max_s is None else max_s
        self._jitter = BACKOFF_JITTER if jitter is None else jitter
        self._shortest_judged_s = (
            SHORTEST_JUDGED_DEADLINE_S if shortest_judged_s is None else shortest_judged_s
        )
        self._check_every_s = CHECK_EVERY_S if check_every_s is None else check_every_s
        self._clock = clock
        self._rand = rand
        self._trouble: dict[Hashable, _Trouble] = {}

    def admit(self, peer: Hashable) -> Attempt | NotAsked:
        """Leave to ask ``peer`` now, or the answer to give without asking it."""
        trouble = self._trouble.get(peer)
        if trouble is None:
            return Attempt(peer, 0, probe=False)
        now = self._clock.monotonic()
        if trouble.probing or now < trouble.retry_at:
            return self._not_asked(trouble, now)
        trouble.probing = True
        return Attempt(peer, trouble.failures, probe=True)

    def answered(self, attempt: Attempt) -> bool:
        """The peer answered (whatever it said): forget its failures. True if it had any."""
        return self._trouble.pop(attempt.peer, None) is not None

    def failed(
        self, attempt: Attempt, status: Status, what: str, deadline_s: float | None = None
    ) -> float | None:
        """The peer was not reached or did not answer in time: back off.

        Returns the new window in seconds, or None when the failure does not
        count: another call of the same round already counted it, or it was
        a TIMEOUT under a deadline too short to judge the peer by.
        """
        too_short = deadline_s is not None and deadline_s < self._shortest_judged_s
        if status is Status.TIMEOUT and too_short:
            self.abandoned(attempt)
            return None
        trouble = self._trouble.get(attempt.peer)
        failures = 0 if trouble is None else trouble.failures
        if attempt.round != failures:
            return None
        window = self.window(failures + 1)
        self._trouble[attempt.peer] = _Trouble(
            failures + 1,
            status,
            what,
            self._clock.monotonic() + window,
            seen_down=status is Status.UNREACHABLE,
        )
        return window

    def abandoned(self, attempt: Attempt) -> None:
        """The call ended with no verdict (cancelled): the next call may probe instead."""
        trouble = self._trouble.get(attempt.peer)
        if attempt.probe and trouble is not None and trouble.failures == attempt.round:
            trouble.probing = False

    def window_left(self, peer: Hashable) -> float | None:
        """Seconds until ``peer`` is asked again; None when nothing holds it back.

        None also while a probe is on its way or after the window ended:
        then a call decides, and a background check has nothing to add.
        """
        trouble = self._trouble.get(peer)
        if trouble is None or trouble.probing:
            return None
        left = trouble.retry_at - self._clock.monotonic()
        return left if left > 0 else None

    def check_delay(self) -> float:
        """How long to wait before the next background check, jittered like the window."""
        return self._check_every_s * (1.0 - self._jitter * self._rand())

    def checked(self, peer: Hashable, serving: bool) -> bool:
        """A background health check's result; True when it ended the window now.

        Serving ends the window only after the peer was seen down (module doc).
        """
        trouble = self._trouble.get(peer)
        if trouble is None or self.window_left(peer) is None:
            return False
        if not serving:
            trouble.seen_down = True
            return False
        if not trouble.seen_down:
            return False
        trouble.retry_at = self._clock.monotonic()
        return True

    def window(self, failures: int) -> float:
        """Back-off after ``failures`` in a row: doubling from the first, capped, jittered."""
        full = min(self._max_s, self._first_s * 2.0 ** min(failures - 1, 64))
        return full * (1.0 - self._jitter * self._rand())

    def _not_asked(self, trouble: _Trouble, now: float) -> NotAsked:
        """The last failure, and when the peer will be asked again, in the clinician's words."""
        tries = "try" if trouble.failures == 1 else f"{trouble.failures} tries"
        said = f"not asked: {trouble.what} at the last {tries}"
        if trouble.probing:
            return NotAsked(trouble.status, f"{said}; another request is retrying it now", 0.0)
        left = trouble.retry_at - now
        at = datetime.fromtimestamp(self._clock.now() + left, UTC).strftime("%H:%M:%S")
        return NotAsked(trouble.status, f"{said}; retried after {at} UTC, in {left:.1f} s", left)
