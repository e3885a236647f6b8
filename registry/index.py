"""The registry's domain: the node directory and the pseudonymised patient index.

Nothing here knows about gRPC or SQL. The servicer hands in plain values,
these objects check them and decide, and a storage object behind the narrow
``RegistryStorage`` protocol keeps the result, so the registry can move from
SQLite to PostgreSQL without touching the rules.

The index holds only (pseudonym, node, time): a pseudonym is 32 opaque bytes,
so nothing the registry keeps or logs can name a patient. Error messages
point at an entry by its position in the batch, never by its pseudonym.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from registry import const
from transmural import const as wire
from transmural.clock import Clock, SystemClock
from transmural.errors import InvalidInput, NotFound, PermissionDenied
from transmural.pseudonym import PSEUDONYM_LENGTH

log = logging.getLogger(__name__)

_NODE_ID = re.compile(const.NODE_ID_PATTERN)
_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """A facility node as the directory knows it."""

    node_id: str
    organisation_name: str
    organisation_id: str
    endpoint: str
    registered_at: float = 0.0
    updated_at: float = 0.0


@dataclass(frozen=True, slots=True)
class IndexChange:
    """One change a node makes to the index: it holds (or no longer holds) a patient."""

    pseudonym: bytes
    withdrawn: bool = False


@dataclass(frozen=True, slots=True)
class PublishResult:
    """How many entries of a batch were published and withdrawn (after de-duplication)."""

    published: int
    withdrawn: int


@dataclass(frozen=True, slots=True)
class Location:
    """The nodes holding data on one pseudonym (empty when none do)."""

    pseudonym: bytes
    holders: tuple[NodeRecord, ...]


class RegistryStorage(Protocol):
    """What the domain needs from storage; each method is one transaction."""

    async def upsert_node(self, node: NodeRecord, now: float) -> NodeRecord: ...

    async def get_node(self, node_id: str) -> NodeRecord | None: ...

    async def list_nodes(self) -> list[NodeRecord]: ...

    async def publish(
        self, node_id: str, published: Sequence[bytes], withdrawn: Sequence[bytes], now: float
    ) -> None: ...

    async def holders(self, pseudonyms: Sequence[bytes]) -> dict[bytes, list[NodeRecord]]: ...


def check_node_id(node_id: str) -> str:
    """The node id if it is well formed; raises InvalidInput saying why not."""
    if not node_id:
        raise InvalidInput("node_id is empty")
    if not _NODE_ID.fullmatch(node_id):
        raise InvalidInput("node_id must be 1-64 characters of lowercase letters, digits and '-'")
    return node_id


def check_endpoint(endpoint: str) -> str:
    """``host:port`` with a real port (1-65535); raises InvalidInput saying why not."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host:
        raise InvalidInput("endpoint must be host:port, e.g. node.example.org:7400")
    if len(host) > const.MAX_ENDPOINT_HOST_LENGTH or not _HOST.fullmatch(host):
        raise InvalidInput("endpoint host must be a host name, an IPv4 address or [IPv6]")
    if not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise InvalidInput("endpoint port must be a number from 1 to 65535")
    return endpoint


def check_text(value: str, field: str, limit: int, *, required: bool) -> str:
    """``value`` stripped, if it fits ``limit`` and has no control characters."""
    value = value.strip()
    if required and not value:
        raise InvalidInput(f"{field} is empty")
    if len(value) > limit:
        raise InvalidInput(f"{field} is longer than {limit} characters")
    if _CONTROL.search(value):
        raise InvalidInput(f"{field} contains control characters")
    return value


def acting_node(requested: str, certified: str | None, action: str) -> str:
    """The node a call acts for: the one its certificate names, when it has one.

    A node id in a request is only a claim. A caller with a certificate may
    leave it empty (it is filled from the certificate) but may not name
    another node; without a certificate (``--insecure-dev``) it is taken on
    trust. ``action`` completes the refusal: "publish for", "register as".
    """
    if certified is None:
        return requested
    if requested and requested != certified:
        raise PermissionDenied(f"{certified}'s certificate cannot {action} {requested}")
    return certified


def check_pseudonym(pseudonym: bytes, position: int) -> bytes:
    """The pseudonym if it is 32 bytes; the error names the entry by position only."""
    if len(pseudonym) != PSEUDONYM_LENGTH:
        raise InvalidInput(
            f"entry {position}: a pseudonym is {PSEUDONYM_LENGTH} bytes (HMAC-SHA256), "
            f"not {len(pseudonym)}"
        )
    return pseudonym


class NodeDirectory:
    """Which nodes exist and where to reach them."""

    def __init__(self, storage: RegistryStorage, clock: Clock | None = None) -> None:
        self._storage = storage
        self._clock = clock or SystemClock()

    async def register(self, node: NodeRecord) -> NodeRecord:
        """Add a node, or update its entry; returns the stored entry."""
        clean = NodeRecord(
            node_id=check_node_id(node.node_id),
            organisation_name=check_text(
                node.organisation_name,
                "organisation_name",
                const.MAX_ORGANISATION_NAME_LENGTH,
                required=True,
            ),
            organisation_id=check_text(
                node.organisation_id,
                "organisation_id",
                const.MAX_ORGANISATION_ID_LENGTH,
                required=False,
            ),
            endpoint=check_endpoint(node.endpoint.strip()),
        )
        previous = await self._storage.get_node(clean.node_id)
        if previous is not None and previous.endpoint != clean.endpoint:
            # Two processes with one node id take the entry from each other unnoticed.
            log.warning(
                "node %s re-registered at a new endpoint: %s replaces %s; "
                "if both still run, two processes share this node id",
                clean.node_id,
                clean.endpoint,
                previous.endpoint,
            )
        stored = await self._storage.upsert_node(clean, self._clock.now())
        verb = "registered" if stored.registered_at == stored.updated_at else "updated"
        log.info(
            "%s node %s (%s) at %s", verb, stored.node_id, stored.organisation_name, stored.endpoint
        )
        return stored

    async def get(self, node_id: str) -> NodeRecord:
        """The node's entry; NotFound when it never registered."""
        node = await self._storage.get_node(check_node_id(node_id))
        if node is None:
            raise NotFound(f"node {node_id!r} is not registered; call RegisterNode first")
        return node

    async def list_nodes(self) -> list[NodeRecord]:
        """Every registered node, ordered by node id."""
        return await self._storage.list_nodes()


class MasterPatientIndex:
    """Which nodes hold data on which pseudonym; never who the patient is."""

    def __init__(
        self, storage: RegistryStorage, directory: NodeDirectory, clock: Clock | None = None
    ) -> None:
        self._storage = storage
        self._directory = directory
        self._clock = clock or SystemClock()

    async def publish(self, node_id: str, entries: Sequence[IndexChange]) -> PublishResult:
        """Apply one batch of a node's changes atomically.

        Within a batch the last change to a pseudonym wins, as if the changes
        had been sent one by one; re-publishing an entry only refreshes its time.
        """
        if len(entries) > wire.MAX_PUBLISH_BATCH:
            raise InvalidInput(
                f"a publish batch holds at most {wire.MAX_PUBLISH_BATCH} entries, "
                f"not {len(entries)}; split it"
            )
        latest: dict[bytes, bool] = {}
        for position, entry in enumerate(entries):
            latest[check_pseudonym(entry.pseudonym, position)] = entry.withdrawn
        await self._directory.get(node_id)
        published = [p for p, withdrawn in latest.items() if not withdrawn]
        withdrawn = [p for p, gone in latest.items() if gone]
        await self._storage.publish(node_id, published, withdrawn, self._clock.now())
        log.info(
            "node %s published %d and withdrew %d index entries",
            node_id,
            len(published),
            len(withdrawn),
        )
        return PublishResult(published=len(published), withdrawn=len(withdrawn))

    async def locate(self, pseudonyms: Sequence[bytes]) -> list[Location]:
        """The holders of each pseudonym, one ``Location`` per request item, in order."""
        if len(pseudonyms) > wire.MAX_LOCATE_BATCH:
            raise InvalidInput(
                f"a locate request holds at most {wire.MAX_LOCATE_BATCH} pseudonyms, "
                f"not {len(pseudonyms)}; split it"
            )
        for position, pseudonym in enumerate(pseudonyms):
            check_pseudonym(pseudonym, position)
        found = await self._storage.holders(list(dict.fromkeys(pseudonyms)))
        log.debug("located %d of %d pseudonyms", len(found), len(pseudonyms))
        return [Location(p, tuple(found.get(p, ()))) for p in pseudonyms]
