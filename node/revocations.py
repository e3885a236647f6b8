"""Revoked certificates, as the registry lists them.

grpc's Python credentials take no revocation list, so the peer port's
interceptor asks this list on every call. The node pulls it from the
registry at start and every REVOCATION_POLL_S, so a revoked node is refused
within that interval. While the registry cannot be reached the last list
stays in force.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from node import const
from transmural.errors import TransmuralError
from transmural.pki import CertificateIdentity

log = logging.getLogger(__name__)


class RevocationSource(Protocol):
    async def revoked_serials(self) -> set[str]: ...


class RevocationList:
    """The serials this node refuses, refreshed from the registry."""

    def __init__(self, source: RevocationSource) -> None:
        self._source = source
        self._serials: frozenset[str] = frozenset()
        self._failing = False

    def is_revoked(self, identity: CertificateIdentity) -> bool:
        return identity.serial in self._serials

    async def refresh(self) -> None:
        """Fetch the list now; keeps the old one (and says so once) on failure."""
        try:
            serials = await self._source.revoked_serials()
        except TransmuralError as error:
            level = logging.DEBUG if self._failing else logging.WARNING
            log.log(level, "cannot refresh revocations, keeping the last list: %s", error)
            self._failing = True
            return
        if self._failing:
            log.warning("revocations refreshed again")
        self._failing = False
        if serials != self._serials:
            log.info("%d revoked certificates", len(serials))
        self._serials = frozenset(serials)

    async def run(self) -> None:
        """Refresh every REVOCATION_POLL_S until cancelled."""
        while True:
            await asyncio.sleep(const.REVOCATION_POLL_S)
            await self.refresh()
