"""What the network operator does beside a running registry: invite, revoke, look.

``transmural-admin invite``, ``revoke`` and ``members`` (and devnet, which
plays the operator) call these. They open the registry's own database file;
SQLite's locking and ``BEGIN IMMEDIATE`` make that safe while the registry
serves, and the registry picks a revocation up within
``REVOCATION_REFRESH_S``. ``members`` opens it read-only: it changes nothing.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from registry import const
from registry.enrolment import InviteRecord, IssuedCertificate, Membership, MembershipRows
from registry.index import NodeRecord
from registry.network import load_network
from registry.store import RegistryStore
from transmural.clock import Clock, SystemClock
from transmural.database import holds_a_database
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


#: A joined node's state: its newest certificate's.
SERVING, REVOKED, EXPIRED = "serving", "revoked", "expired"
#: How an unused invite ended: closed by the operator (``CLOSED_REVOKED``,
#: ``CLOSED_REPLACED``, as ``InviteRecord.closed_because`` says) or this.
ENDED_EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class MemberNode:
    """A node that joined, as its newest certificate and the directory show it."""

    node_id: str
    organisation_id: str
    organisation_name: str
    organisation_category: str
    state: str  # SERVING, REVOKED or EXPIRED
    serial: str
    issued_at: float
    not_after: float
    revoked_at: float | None
    earlier_serials: tuple[str, ...]  # its certificates before a re-join, newest first
    endpoint: str  # as it last registered; "" when it is not in the directory
    last_registered_at: float | None  # None: never registered, or dropped at its revoke


@dataclass(frozen=True, slots=True)
class MemberInvite:
    """An invite nobody joined with: still open, or ended unused."""

    node_id: str
    organisation_id: str
    organisation_name: str
    organisation_category: str
    created_at: float
    expires_at: float
    ended: str  # "" while open; CLOSED_REVOKED, CLOSED_REPLACED or ENDED_EXPIRED
    ended_at: float | None


@dataclass(frozen=True, slots=True)
class Members:
    """The network's membership as the registry database held it at ``now``."""

    now: float
    nodes: list[MemberNode]  # by organisation id, then node id
    open_invites: list[MemberInvite]
    ended_invites: list[MemberInvite]
    # Directory entries with no certificate from this registry: nodes of an
    # --insecure-dev network, or given certificates by hand from the CA.
    uncertified: list[NodeRecord]

    def count(self, state: str) -> int:
        return sum(1 for node in self.nodes if node.state == state)


async def members(db: Path, clock: Clock | None = None) -> Members:
    """Who joined, who is invited and who registered; reads the database, writes nothing."""
    clock = clock or SystemClock()
    store = await _open_existing(db, clock, read_only=True)
    try:
        rows = await store.membership()
    finally:
        await store.close()
    return assemble_members(rows, clock.now())


def assemble_members(rows: MembershipRows, now: float) -> Members:
    """One ``MemberNode`` per node id (its newest certificate), invites open or ended."""
    by_node: dict[str, list[IssuedCertificate]] = {}
    for issued in sorted(rows.certificates, key=lambda c: -c.certificate.issued_at):
        by_node.setdefault(issued.certificate.node_id, []).append(issued)
    directory = {node.node_id: node for node in rows.directory}
    nodes = [_member_node(certs, directory.get(node_id), now) for node_id, certs in by_node.items()]
    invites = [_member_invite(record, now) for record in rows.unused_invites]
    return Members(
        now=now,
        nodes=sorted(nodes, key=lambda n: (n.organisation_id, n.node_id)),
        open_invites=[i for i in invites if not i.ended],
        ended_invites=[i for i in invites if i.ended],
        uncertified=[node for node in rows.directory if node.node_id not in by_node],
    )


def _member_node(
    certificates: list[IssuedCertificate], registered: NodeRecord | None, now: float
) -> MemberNode:
    """A node from its certificates, newest first, and its directory entry if any."""
    newest = certificates[0]
    cert = newest.certificate
    if newest.revoked_at is not None:
        state = REVOKED
    else:
        state = EXPIRED if cert.not_after <= now else SERVING
    return MemberNode(
        node_id=cert.node_id,
        organisation_id=cert.organisation_id,
        # The invite it redeemed names it; the directory does when that invite is gone.
        organisation_name=newest.organisation_name
        or (registered.organisation_name if registered else ""),
        organisation_category=newest.organisation_category,
        state=state,
        serial=cert.serial,
        issued_at=cert.issued_at,
        not_after=cert.not_after,
        revoked_at=newest.revoked_at,
        earlier_serials=tuple(c.certificate.serial for c in certificates[1:]),
        endpoint=registered.endpoint if registered else "",
        last_registered_at=registered.updated_at if registered else None,
    )


def _member_invite(record: InviteRecord, now: float) -> MemberInvite:
    if record.closed_because is not None:
        ended, ended_at = record.closed_because, record.closed_at
    elif record.expires_at <= now:
        ended, ended_at = ENDED_EXPIRED, record.expires_at
    else:
        ended, ended_at = "", None
    return MemberInvite(
        node_id=record.node_id,
        organisation_id=record.organisation_id,
        organisation_name=record.organisation_name,
        organisation_category=record.organisation_category,
        created_at=record.created_at,
        expires_at=record.expires_at,
        ended=ended,
        ended_at=ended_at,
    )


async def _open_existing(
    db: Path, clock: Clock | None, *, read_only: bool = False
) -> RegistryStore:
    """The registry's database; never a new empty one that the registry does not read."""
    if not await asyncio.to_thread(holds_a_database, db):
        raise ConfigError(
            f"there is no registry database {db}: give the --db the registry serves with"
        )
    return await RegistryStore.open(db, clock, read_only=read_only)
