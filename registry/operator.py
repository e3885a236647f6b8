"""What the network operator does beside a running registry: invite and revoke.

``transmural-admin invite`` and ``revoke`` (and devnet, which plays the
operator) call these. They open the registry's own database file; SQLite's
locking and ``BEGIN IMMEDIATE`` make that safe while the registry serves,
and the registry picks a revocation up within ``REVOCATION_REFRESH_S``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import NamedTuple

from registry import const
from registry.enrolment import Membership
from registry.network import load_network
from registry.store import RegistryStore
from transmural.clock import Clock, SystemClock
from transmural.errors import ConfigError, NotFound


async def invite(
    network_dir: Path,
    db: Path,
    organisation_id: str,
    organisation_name: str,
    node_id: str | None = None,
    join_address: str = "",
    ttl_s: int = const.DEFAULT_INVITE_TTL_S,
    clock: Clock | None = None,
    organisation_category: str = "",
) -> str:
    """Record a one-time invite in the registry database; returns the token text."""
    network = await asyncio.to_thread(load_network, network_dir)
    clock = clock or SystemClock()
    store = await _open_existing(db, clock)
    try:
        await store.bind_network(network.ca_fingerprint, network.name, clock.now())
        membership = Membership(store, ca_cert=network.ca_cert, clock=clock)
        return await membership.create_invite(
            organisation_id, organisation_name, node_id, join_address, ttl_s,
            organisation_category=organisation_category,
        )  # fmt: skip
    finally:
        await store.close()


class Revoked(NamedTuple):
    """What a revoke did: certificates revoked now, open invites closed."""

    serials: list[str]
    closed_invites: int


async def revoke(db: Path, organisation_id: str, clock: Clock | None = None) -> Revoked:
    """Close the organisation's open invites and revoke every certificate it has.

    NotFound when it has neither (it was never invited, or every invite was used or
    expired and never joined).
    """
    store = await _open_existing(db, clock)
    try:
        membership = Membership(store, clock=clock)
        closed = await membership.close_invites(organisation_id)
        try:
            serials = await membership.revoke(organisation_id)
        except NotFound:
            if not closed:
                raise
            serials = []
        return Revoked(serials, closed)
    finally:
        await store.close()


async def _open_existing(db: Path, clock: Clock | None) -> RegistryStore:
    """The registry's database; never a new empty one that the registry does not read."""
    if not await asyncio.to_thread(db.is_file):
        raise ConfigError(
            f"there is no registry database {db}: give the --db the registry serves with"
        )
    return await RegistryStore.open(db, clock)
