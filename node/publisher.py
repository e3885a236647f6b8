"""Keeps the registry's index in step with this node's store.

Ingest and consent changes (in this process or in the admin CLI, on the
same database file) append pseudonyms to a durable outbox; whether each is
published or un-published is decided from consent at send time
(``node.listing``). The publisher registers the
node, then drains the outbox in batches, oldest first, and marks a batch
sent only after the registry accepted it: a registry that is down delays
publishing, it never loses an entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from node import const
from node.answers import Facility
from node.listing import PatientListing
from node.registry_link import RegistryLink
from node.store import NodeStore
from transmural.clock import Clock, SystemClock
from transmural.const import MAX_PUBLISH_BATCH
from transmural.errors import ConfigError, NotFound, TransmuralError

log = logging.getLogger(__name__)


class IndexPublisher:
    """Registers this node and sends its index changes to the registry."""

    def __init__(
        self,
        store: NodeStore,
        registry: RegistryLink,
        facility: Facility,
        clock: Clock | None = None,
        listing: PatientListing | None = None,
    ) -> None:
        self._listing = listing
        self._store = store
        self._registry = registry
        self._facility = facility
        self._clock = clock or SystemClock()
        self._registered_at: float | None = None
        self._swept_at: float | None = None
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Publish now rather than at the next poll."""
        self._wake.set()

    async def run(self) -> None:
        """Publish until cancelled, backing off while the registry fails."""
        retry_s = const.PUBLISH_RETRY_MIN_S
        failing = False
        while True:
            try:
                sent = await self.publish_pending()
            except TransmuralError as error:
                # A ConfigError is this node's to fix (its network key): said loudest.
                loud = logging.ERROR if isinstance(error, ConfigError) else logging.WARNING
                log.log(
                    logging.DEBUG if failing else loud,
                    "publishing to the registry failed: %s",
                    error,
                )
                failing = True
                await asyncio.sleep(retry_s)
                retry_s = min(retry_s * 2, const.PUBLISH_RETRY_MAX_S)
                continue
            if failing:
                log.warning("the registry answers again; publishing resumed")
            failing, retry_s = False, const.PUBLISH_RETRY_MIN_S
            await self._sweep_when_due()
            if sent == 0:
                await self._idle()

    async def publish_pending(self) -> int:
        """Send every pending change; returns how many were sent."""
        await self._register_when_due()
        total = 0
        while changes := await self._store.pending_index_changes(MAX_PUBLISH_BATCH):
            if self._listing is not None:
                changes = await self._listing.resolve(changes)
            try:
                await self._registry.publish(self._facility.node_id, changes)
            except NotFound:
                self._registered_at = None  # the registry forgot us: register again
                raise
            await self._store.mark_index_changes_sent(changes[-1].seq)
            total += len(changes)
        if total:
            log.info("published %d index changes", total)
        return total

    async def _sweep_when_due(self) -> None:
        """Re-queue patients whose consents start or end in time (index follows consent)."""
        if self._listing is None:
            return
        now = self._clock.monotonic()
        if self._swept_at is not None and now - self._swept_at < const.LISTING_SWEEP_S:
            return
        self._swept_at = now
        queued = await self._store.request_time_bound_checks()
        if queued:
            log.debug("re-checking the listing of %d patients with time-bound consents", queued)
            self.wake()

    async def _register_when_due(self) -> None:
        """Register at start, then again every REGISTER_INTERVAL_S.

        Re-registering keeps the directory right after a registry restart
        or after someone else claimed this node id for a while.
        """
        now = self._clock.monotonic()
        if (
            self._registered_at is not None
            and now - self._registered_at < const.REGISTER_INTERVAL_S
        ):
            return
        await self._registry.register(self._facility)
        if self._registered_at is None:
            log.info("registered as %s at %s", self._facility.node_id, self._registry.address)
        self._registered_at = now

    async def _idle(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), const.PUBLISH_POLL_S)
        self._wake.clear()
