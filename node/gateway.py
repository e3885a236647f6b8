"""The asking side: a clinician's question fanned out over the network.

Pseudonymise the identifier, ask the registry who holds it, then ask every
holder at once, each under its own deadline, and hand each answer on the
moment it arrives. A slow or dead peer never holds back the others: its
own deadline turns it into ``timeout`` or ``unreachable``.

A search asks for documents, the live report for structured entries; both
run the same fan-out (``Gateway._fan_out``), only the peer call differs.

A registry that hangs costs one search its deadline, not every search: after
a timeout the registry backs off (``PeerHealth``, as a failing peer does)
and searches go straight to the remembered holders until a probe gets an
answer again. The probe is one clinician's search, so when that patient's
holders are remembered the clinician waits only PROBE_PATIENCE_S for it:
the probe goes on in the background and its answer decides the back-off.
A registry that refuses connections fails fast anyway.

The registry down: the gateway remembers each patient's holders from the
last successful locate (``RecentLocations``, up to LOCATION_CACHE_S) and
asks those instead. ``Located.incomplete`` and every ``ok`` facility's
message then carry ``REGISTRY_DOWN`` (a refusal or a timeout keeps its own
words), so neither a clinician nor a program reads it as the whole picture;
with nothing remembered the search fails (``Unavailable``), never "no records".

The gateway talks to the registry and to peers through two small ports
(``HolderIndex``, ``PeerLink``) so that it never touches gRPC itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Protocol, TypeVar

from node import const
from node.answers import (
    Facility,
    FacilityAnswer,
    FacilityItemsAnswer,
    Located,
    Requester,
    Status,
    check_document_id,
)
from node.clinical_items import ClinicalItem
from node.peer_health import Attempt, NotAsked, PeerHealth
from node.records import DocumentRecord
from transmural.clock import Clock, SystemClock
from transmural.errors import (
    Excluded,
    InvalidInput,
    NotFound,
    PermissionDenied,
    TimedOut,
    TransmuralError,
    Unavailable,
)
from transmural.identifiers import Identifier
from transmural.pseudonym import Pseudonymiser

log = logging.getLogger(__name__)

PURPOSES = ("treatment", "emergency")
MAX_TEXT = 500
#: Said in each facility's message when holders came from memory, not the registry.
REGISTRY_DOWN = "registry unreachable: results may be incomplete"
#: How the registry is named in its back-off (``PeerHealth`` keys peers by anything).
REGISTRY = "registry"
#: How long a search with remembered holders waits for a registry probe.
PROBE_PATIENCE_S = 0.5


class HolderIndex(Protocol):
    """Who holds data on a pseudonym (the registry, seen from a node)."""

    async def locate(self, pseudonym: bytes) -> list[Facility]: ...


#: What a facility answers with: documents (search) or report entries.
Part = TypeVar("Part")
#: The answer the fan-out yields per facility: FacilityAnswer or FacilityItemsAnswer.
Answer = TypeVar("Answer")
#: One question to one peer: (facility, pseudonym, requester, correlation id, deadline).
PeerCall = Callable[
    [Facility, bytes, Requester, str, float], Awaitable[tuple[Status, str, list[Part]]]
]
#: Builds the answer from (facility, status, elapsed ms, message, parts).
AnswerOf = Callable[[Facility, Status, int, str, list[Part]], Answer]


class PeerLink(Protocol):
    """Calls to other nodes. Transport failures come back as statuses.

    A fetch raises instead (Unavailable too when a chunk takes longer than
    ``chunk_deadline_s``): it asks one facility, whose failure is the answer.
    """

    async def find_documents(
        self,
        facility: Facility,
        pseudonym: bytes,
        requester: Requester,
        correlation_id: str,
        deadline_s: float,
    ) -> tuple[Status, str, list[DocumentRecord]]: ...

    async def find_items(
        self,
        facility: Facility,
        pseudonym: bytes,
        requester: Requester,
        correlation_id: str,
        deadline_s: float,
    ) -> tuple[Status, str, list[ClinicalItem]]: ...

    def fetch_document(
        self,
        facility: Facility,
        pseudonym: bytes,
        document_id: str,
        requester: Requester,
        correlation_id: str,
        chunk_deadline_s: float,
    ) -> AsyncGenerator[tuple[DocumentRecord | None, bytes]]: ...


class AskingAudit(Protocol):
    """The asking side's audit records (``node.audit_asking`` writes them)."""

    async def asked(
        self,
        *,
        action: str,
        outcome: str,
        requester: Requester,
        pseudonym: bytes,
        correlation_id: str,
        reason: str,
        node: str,
        documents: list[str],
    ) -> None: ...


class RecentLocations:
    """Each pseudonym's holders as last located, for a while, least recent dropped first."""

    def __init__(
        self,
        clock: Clock,
        keep_s: float = const.LOCATION_CACHE_S,
        size: int = const.LOCATION_CACHE_SIZE,
    ) -> None:
        self._clock = clock
        self._keep_s = keep_s
        self._size = size
        self._known: OrderedDict[bytes, tuple[float, list[Facility]]] = OrderedDict()

    def remember(self, pseudonym: bytes, holders: list[Facility]) -> None:
        self._known[pseudonym] = (self._clock.monotonic(), list(holders))
        self._known.move_to_end(pseudonym)
        while len(self._known) > self._size:
            self._known.popitem(last=False)

    def recall(self, pseudonym: bytes) -> tuple[list[Facility], float] | None:
        """(holders, age in seconds) when known recently and someone held data."""
        known = self._known.get(pseudonym)
        if known is None:
            return None
        age = self._clock.monotonic() - known[0]
        if age > self._keep_s:
            del self._known[pseudonym]
            return None
        return (list(known[1]), age) if known[1] else None

    def forget_nodes(self, node_ids: set[str]) -> set[str]:
        """Drop these nodes from every remembered list (their certificates were revoked);
        returns those that were remembered anywhere."""
        forgotten: set[str] = set()
        for pseudonym, (when, holders) in list(self._known.items()):
            kept = [f for f in holders if f.node_id not in node_ids]
            if len(kept) != len(holders):
                forgotten |= {f.node_id for f in holders} - {f.node_id for f in kept}
                self._known[pseudonym] = (when, kept)
        return forgotten


class Gateway:
    """Search, report and fetch across the network on a clinician's behalf."""

    def __init__(
        self,
        pseudonymiser: Pseudonymiser,
        index: HolderIndex,
        peers: PeerLink,
        clock: Clock | None = None,
        default_deadline_s: float = const.PEER_DEADLINE_S,
        audit: AskingAudit | None = None,
        registry_health: PeerHealth | None = None,
    ) -> None:
        self._audit = audit
        self._pseudonymiser = pseudonymiser
        self._index = index
        self._peers = peers
        self._clock = clock or SystemClock()
        self._default_deadline_s = default_deadline_s
        self._recent = RecentLocations(self._clock)
        self._registry_health = registry_health or PeerHealth(self._clock)
        self._probes: set[asyncio.Task[list[Facility]]] = set()

    def forget_revoked(self, node_ids: set[str]) -> None:
        """Never ask these nodes from memory again: their certificates were revoked.

        While the registry is up it lists no revoked node; while it is down
        the remembered holders would still name one.
        """
        forgotten = self._recent.forget_nodes(node_ids)
        if forgotten:  # said only when it changes what a search asks
            log.info(
                "revoked, no longer asked from remembered holders: %s",
                ", ".join(sorted(forgotten)),
            )

    def search(
        self, identifier: Identifier, requester: Requester, deadline_s: float | None = None
    ) -> AsyncIterator[Located | FacilityAnswer]:
        """Yield the holders found, then each facility's documents as they arrive."""
        return self._fan_out(
            "search", identifier, requester, deadline_s,
            self._peers.find_documents, FacilityAnswer, _document_ids,
        )  # fmt: skip

    def report(
        self, identifier: Identifier, requester: Requester, deadline_s: float | None = None
    ) -> AsyncIterator[Located | FacilityItemsAnswer]:
        """Yield the holders found, then each facility's report entries as they arrive."""
        return self._fan_out(
            "report", identifier, requester, deadline_s,
            self._peers.find_items, FacilityItemsAnswer, _no_ids,
        )  # fmt: skip

    async def fetch(
        self, identifier: Identifier, node_id: str, document_id: str, requester: Requester
    ) -> AsyncGenerator[tuple[DocumentRecord | None, bytes]]:
        """Stream one document from the facility ``node_id``."""
        check_requester(requester)
        check_document_id(document_id)  # before the registry and the facility are asked
        pseudonym = self._pseudonymiser.pseudonym(identifier)
        holders, _ = await self._locate(pseudonym)
        facility = next((f for f in holders if f.node_id == node_id), None)
        if facility is None:
            raise NotFound(f"facility {node_id!r} is not listed as holding this patient's data")
        correlation_id = uuid.uuid4().hex
        log.info("fetch %s: document %s from %s", correlation_id, document_id, node_id)
        await self._record(
            "fetch", "granted", requester, pseudonym, correlation_id,
            f"asked {node_id}", node=node_id, documents=[document_id],
        )  # fmt: skip
        pieces = self._peers.fetch_document(
            facility, pseudonym, document_id, requester, correlation_id, self._default_deadline_s
        )
        try:
            # Closed at once when this generator is (a clinician who goes away
            # must not leave the facility streaming to no one until its deadline).
            async with contextlib.aclosing(pieces):
                async for piece in self._within_deadline(pieces, node_id):
                    yield piece
        except TransmuralError as refused:
            # The facility's answer, as the asking side saw it.
            outcome = "denied" if isinstance(refused, PermissionDenied | NotFound) else "error"
            await self._record(
                "fetch-answer", outcome, requester, pseudonym, correlation_id,
                f"{node_id}: {refused}", node=node_id, documents=[document_id],
            )  # fmt: skip
            raise
        await self._record(
            "fetch-answer", "granted", requester, pseudonym, correlation_id,
            f"{node_id}: received", node=node_id, documents=[document_id],
        )  # fmt: skip

    async def _locate(self, pseudonym: bytes) -> tuple[list[Facility], str]:
        """Holders from the registry, or remembered ones with a note saying so."""
        known = self._recent.recall(pseudonym)
        patience_s = None if known is None else PROBE_PATIENCE_S
        try:
            holders = await self._registry_locate(pseudonym, patience_s)
        except Excluded:
            raise
        except Unavailable:
            if known is None:
                raise
            holders, age_s = known
            log.warning("registry unreachable: asking holders as located %.0f s ago", age_s)
            return holders, f"{REGISTRY_DOWN} (holders as known {age_s:.0f} s ago)"
        return holders, ""

    async def _registry_locate(
        self, pseudonym: bytes, patience_s: float | None = None
    ) -> list[Facility]:
        """The registry's answer, unless it timed out lately (then Unavailable at once).

        When this call is the probe of a registry that timed out and
        ``patience_s`` is given, waits only that long (module doc).
        """
        attempt = self._registry_health.admit(REGISTRY)
        if isinstance(attempt, NotAsked):
            raise Unavailable(f"the registry was {attempt.message}")
        asking = self._ask_registry(attempt, pseudonym)
        if not attempt.probe or patience_s is None:
            return await asking
        probe = asyncio.create_task(asking, name="registry-probe")
        self._probes.add(probe)  # held until done: the loop keeps only weak references
        probe.add_done_callback(_forget_probe(self._probes))
        try:
            async with asyncio.timeout(patience_s):
                return await asyncio.shield(probe)
        except TimeoutError:
            raise Unavailable(
                f"the registry is being retried and did not answer within {patience_s:g} s"
            ) from None

    async def _ask_registry(self, attempt: Attempt, pseudonym: bytes) -> list[Facility]:
        """Ask the registry; tell its back-off how that went, remember what it said."""
        try:
            holders = await self._index.locate(pseudonym)
        except TimedOut as error:
            window = self._registry_health.failed(attempt, Status.TIMEOUT, "no answer in time")
            if window is not None:
                log.warning("%s; not asking it for %.1f s", error, window)
            raise
        except PermissionDenied as refused:
            # This node is refused (its certificate revoked): the network cannot
            # answer it, which is not "no facility knows the patient".
            self._registry_health.abandoned(attempt)
            raise Excluded(f"this node is refused by the {refused}") from None
        except BaseException:
            # Refused or cancelled: no verdict on a hang, and a probe may be tried again.
            self._registry_health.abandoned(attempt)
            raise
        if self._registry_health.answered(attempt):
            log.warning("the registry answers again")
        self._recent.remember(pseudonym, holders)
        return holders

    async def _within_deadline(
        self, pieces: AsyncGenerator[tuple[DocumentRecord | None, bytes]], node_id: str
    ) -> AsyncIterator[tuple[DocumentRecord | None, bytes]]:
        """Each chunk within the peer deadline: a frozen facility is reported in
        seconds, while a large document may take minutes.

        The peer link enforces the deadline itself (and counts a silent
        facility as failing); this is the belt to its braces, as in ``_ask``.
        """
        while True:
            try:
                async with asyncio.timeout(self._default_deadline_s + 0.5):
                    piece = await anext(pieces)
            except StopAsyncIteration:
                return
            except TimeoutError:
                await pieces.aclose()
                raise Unavailable(
                    f"facility {node_id} did not answer within {self._default_deadline_s:g} s"
                ) from None
            yield piece

    async def _record(
        self,
        action: str,
        outcome: str,
        requester: Requester,
        pseudonym: bytes,
        correlation_id: str,
        reason: str,
        node: str = "",
        documents: list[str] | None = None,
    ) -> None:
        if self._audit is not None:
            await self._audit.asked(
                action=action, outcome=outcome, requester=requester, pseudonym=pseudonym,
                correlation_id=correlation_id, reason=reason, node=node,
                documents=documents or [],
            )  # fmt: skip

    def _deadline(self, deadline_s: float | None) -> float:
        if deadline_s is None or deadline_s <= 0:
            return self._default_deadline_s
        return min(deadline_s, const.MAX_PEER_DEADLINE_S)

    async def _fan_out(
        self,
        action: str,
        identifier: Identifier,
        requester: Requester,
        deadline_s: float | None,
        call: PeerCall[Part],
        answer: AnswerOf[Part, Answer],
        audited: Callable[[list[Part]], list[str]],
    ) -> AsyncIterator[Located | Answer]:
        """Ask every holder with ``call``; yield Located, then ``answer``s as they arrive.

        Search and report differ only in the peer call, the answer type and
        which ids the audit record names (``audited``); the order, deadlines
        and audit records (``action``, then ``<action>-answer`` per facility)
        are this one method's.
        """
        check_requester(requester)
        deadline = self._deadline(deadline_s)
        pseudonym = self._pseudonymiser.pseudonym(identifier)
        correlation_id = uuid.uuid4().hex
        holders, note = await self._locate(pseudonym)
        log.info("%s %s: %d holders", action, correlation_id, len(holders))
        # Logged before anyone is asked: no access without its audit record.
        await self._record(
            action, "granted", requester, pseudonym, correlation_id,
            f"asked {len(holders)} {'facility' if len(holders) == 1 else 'facilities'}: "
            f"{', '.join(f.node_id for f in holders)}{f' ({note})' if note else ''}",
        )  # fmt: skip
        yield Located(holders, correlation_id, note)
        tasks = [
            asyncio.create_task(
                self._ask_and_record(
                    action, call, audited, f, pseudonym, requester, correlation_id, deadline
                )
            )
            for f in holders
        ]
        try:
            for finished in asyncio.as_completed(tasks):
                facility, status, elapsed_ms, message, parts = await finished
                if note and status is Status.OK:  # a refusal keeps its own words
                    message = f"{message}; {note}" if message else note
                yield answer(facility, status, elapsed_ms, message, parts)
        finally:
            for task in tasks:
                task.cancel()

    async def _ask_and_record(
        self,
        action: str,
        call: PeerCall[Part],
        audited: Callable[[list[Part]], list[str]],
        facility: Facility,
        pseudonym: bytes,
        requester: Requester,
        correlation_id: str,
        deadline_s: float,
    ) -> tuple[Facility, Status, int, str, list[Part]]:
        """Ask one facility and write the record of its answer before handing it on.

        Each facility's task writes its own record, so answers arriving
        together are logged together (the audit log commits them as one).
        """
        started = self._clock.monotonic()
        try:
            # The peer link enforces the deadline on the wire; this is the
            # belt to its braces, so one peer can never stall the fan-out.
            async with asyncio.timeout(deadline_s + 0.5):
                status, message, parts = await call(
                    facility, pseudonym, requester, correlation_id, deadline_s
                )
        except TimeoutError:
            status, message, parts = Status.TIMEOUT, "no answer before the deadline", []
        elapsed_ms = int((self._clock.monotonic() - started) * 1000)
        if status is not Status.OK:
            log.info("%s %s: %s answered %s", action, correlation_id, facility.node_id, status)
        outcome = {Status.OK: "granted", Status.CONSENT_DENIED: "denied"}.get(status, "error")
        await self._record(
            f"{action}-answer", outcome, requester, pseudonym, correlation_id,
            f"{facility.node_id}: {status}", node=facility.node_id, documents=audited(parts),
        )  # fmt: skip
        return facility, status, elapsed_ms, message, parts


def _document_ids(documents: list[DocumentRecord]) -> list[str]:
    return [d.document_id for d in documents]


def _no_ids(items: list[ClinicalItem]) -> list[str]:
    """A report's audit records name no documents; the holder logs the count."""
    return []


def _forget_probe(
    probes: set[asyncio.Task[list[Facility]]],
) -> Callable[[asyncio.Task[list[Facility]]], None]:
    """A done-callback that drops a finished probe; its failure was logged by the probe."""

    def forget(probe: asyncio.Task[list[Facility]]) -> None:
        probes.discard(probe)
        if not probe.cancelled():
            probe.exception()  # retrieved: its outcome is in the back-off already

    return forget


def check_requester(requester: Requester) -> None:
    """Refuse a request that does not say who asks and why."""
    if not requester.clinician_id:
        raise InvalidInput("requester has no clinician id")
    if requester.purpose_of_use not in PURPOSES:
        raise InvalidInput(
            f"purpose of use must be one of {', '.join(PURPOSES)}, not {requester.purpose_of_use!r}"
        )
    if requester.purpose_of_use == "emergency" and not requester.reason.strip():
        raise InvalidInput("an emergency (break-the-glass) request must give a reason")
    for text, what in ((requester.reason, "reason"), (requester.on_behalf_of, "on behalf of")):
        if len(text) > MAX_TEXT or not text.isprintable():
            raise InvalidInput(f"{what}: at most {MAX_TEXT} printable characters")
