"""Revoked certificates, as the registry lists them.

grpc's Python credentials take no revocation list, so the peer port's
interceptor asks this list on every call. The node pulls it from the
registry at start and every REVOCATION_POLL_S, so a revoked node is refused
within that interval. The last list fetched is kept in the node's database:
while the registry cannot be reached, even across a restart, it stays in
force.

The asking side needs it too: the gateway remembers each patient's holders
to answer while the registry is down, and a node revoked since must not be
asked (it would get the pseudonym and a signed assertion). Each refresh
tells ``on_revoked`` the node ids of certificates newly revoked.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

from node import const
from transmural.errors import PermissionDenied, TransmuralError
from transmural.pki import CertificateIdentity

log = logging.getLogger(__name__)

_REFUSED_ADVICE = (
    "ask the network operator for a new invite for this node id, stop the node and run "
    "`transmural-admin rejoin TOKEN --config node.toml` (README: a node the registry refuses; "
    "if a rejoin was cut off after the registry answered, the operator revokes again first)"
)


class RevocationSource(Protocol):
    async def revocations(self) -> dict[str, str]: ...


class RevokedSerialStore(Protocol):
    async def revoked_serials(self) -> set[str]: ...

    async def replace_revoked_serials(self, serials: set[str]) -> None: ...


class RevocationList:
    """The serials this node refuses, refreshed from the registry, kept on disk."""

    def __init__(
        self,
        source: RevocationSource,
        store: RevokedSerialStore,
        on_revoked: Callable[[set[str]], None] | None = None,
    ) -> None:
        self._source = source
        self._store = store
        self._on_revoked = on_revoked
        self._serials: frozenset[str] = frozenset()
        self._failing = False

    async def load(self) -> None:
        """Start from the list kept at the last refresh."""
        self._serials = frozenset(await self._store.revoked_serials())

    def is_revoked(self, identity: CertificateIdentity) -> bool:
        return identity.serial in self._serials

    async def refresh(self) -> None:
        """Fetch the list now; keeps the old one (and says so once) on failure."""
        try:
            revoked = await self._source.revocations()
        except PermissionDenied as refused:  # this node's own certificate (revoked, unknown)
            level = logging.DEBUG if self._failing else logging.ERROR
            log.log(level, "%s; peers refuse this node too: %s", refused, _REFUSED_ADVICE)
            self._failing = True
            return
        except TransmuralError as error:
            level = logging.DEBUG if self._failing else logging.WARNING
            log.log(level, "cannot refresh revocations, keeping the last list: %s", error)
            self._failing = True
            return
        if self._failing:
            log.warning("revocations refreshed again")
        self._failing = False
        serials = set(revoked)
        if serials != self._serials:
            log.info("%d revoked certificates", len(serials))
            await self._store.replace_revoked_serials(serials)
        newly = {node_id for serial, node_id in revoked.items() if serial not in self._serials}
        self._serials = frozenset(serials)
        if newly and self._on_revoked is not None:
            self._on_revoked(newly)

    async def run(self) -> None:
        """Refresh every REVOCATION_POLL_S until cancelled."""
        while True:
            await asyncio.sleep(const.REVOCATION_POLL_S)
            await self.refresh()
