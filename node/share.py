"""The node's shares (``transmural.share``): per clinician at the gateway
port, per calling facility at the peer port.

One clinician's script looping searches (or a leaked token) must not take
every slot of the gateway; one facility whose gateway misbehaves (or is
hostile) must not take every slot of another's peer port.
"""

from __future__ import annotations

from node import const
from transmural.share import Share


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
