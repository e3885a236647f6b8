"""The node's audit log: append-only, hash-chained, in the node's own SQLite file.

Every access, grant and denial is one ``AuditRecord`` (DESIGN flow 7).
``AuditLog.append`` writes it in a ``BEGIN IMMEDIATE`` transaction (on the
database's thread, in one hop: ``Database.run``) that
reads the last record's hash and inserts the new one (with any others
waiting at that moment, in order) with

    hash = SHA-256(prev_hash || canonical JSON of the record, seq included)

so each record commits to everything before it. The first record's
``prev_hash`` is ``GENESIS`` (32 zero bytes). If the write fails, append
raises ``Unavailable`` and the transaction rolls back, so the chain is as it
was; the caller then refuses the access: no access without its log line.

Appends are serialised twice over: the database's one connection runs one
transaction at a time (``Database.transaction`` holds its lock), and
``BEGIN IMMEDIATE`` takes SQLite's write lock first, so the node server and
the admin CLI writing the same file cannot both read the same last hash.

Migration ``_V5`` adds triggers that abort any UPDATE or DELETE on
``audit_log``: they stop accidents, not an attacker with the file. What
finds tampering is ``verify``, which walks the chain in ``seq`` order and
names the first record that was changed, removed or moved. A chain cannot
show that records were cut off its end (a consistent prefix verifies); that
needs the last hash kept somewhere else, e.g. printed by ``verify`` into an
operator's log or sent to the registry: a later step, not done here.

Fields, after NEN 7513 (which builds on the IHE ATNA / RFC 3881 record):

    time                   EventDateTime (UTC, milliseconds)
    event_id               a unique id of the event (ATNA has none; NEN 7513 asks each
                           line be identifiable)
    action                 EventID + EventTypeCode, as one local code (search, fetch, ...)
    outcome, outcome_reason EventOutcomeIndicator (granted 0, denied 4, error 8) and
                           EventOutcomeDescription: why it was refused or failed
    clinician_id, role     ActiveParticipant UserID and RoleIDCode (the requestor)
    on_behalf_of           a second ActiveParticipant: the responsible user (NEN 7513
                           "verantwoordelijke") on whose behalf the clinician acted
    organisation_id        the requestor's organisation (NEN 7513; URA/AGB)
    requesting_node        ActiveParticipant for the calling node: its certificate identity
    requesting_address     NetworkAccessPointID
    purpose_of_use         PurposeOfUse (treatment, emergency, ...)
    patient_key, pseudonym ParticipantObject, type person / role patient: the local id
                           at this node, and the pseudonym as the network knows it
    document_ids           ParticipantObject, type system object / role report, one each
    consent_rule           which consent rule decided (NEN 7513 asks for the ground
                           of the access; ATNA has no field for it)
    break_the_glass(_reason) emergency access flag and free-text reason (NEN 7513
                           requires it marked; ATNA would code it as purpose ETREAT)
    correlation_id         ParticipantObjectDetail "query id": the same on the asking
                           node's record and every answering node's record of one search
    side                   asking | answering | local: UserIsRequestor, seen from here

Left out, and why:
    EventActionCode (C/R/U/D/E)  follows from ``action``.
    UserName, patient name       names are personal data; the node resolves the user id
                                 (its users table) and the patient key (its patients
                                 table) when a person needs them, as ``export`` does.
    ParticipantObjectQuery       the query is the patient identifier: storing it would
                                 repeat the national identifier in every line.
    AuditSourceID, EnterpriseSiteID  every record of this log has the same source, this
                                 node and its organisation; an export to a SIEM adds them.
    ParticipantObjectSensitivity the document's data category is in the node's data,
                                 and which category consent removed is in consent_rule.

A future field is a new column and a new hash version; records hashed under
the old field set must keep verifying as they are.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import json
import logging
import re
import sqlite3
import uuid
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, TypeVar

import aiosqlite

from transmural.clock import Clock
from transmural.errors import Unavailable

log = logging.getLogger(__name__)

#: ``prev_hash`` of the first record.
GENESIS = bytes(32)
#: Records read and checked per query by ``verify`` (bounds memory on a big log).
VERIFY_BATCH = 2_000
#: Most records written in one transaction by the group commit.
MAX_BATCH = 256

Result = TypeVar("Result")
Outcome = Literal["granted", "denied", "error"]
Side = Literal["asking", "answering", "local"]
OUTCOMES: tuple[str, ...] = ("granted", "denied", "error")
SIDES: tuple[str, ...] = ("asking", "answering", "local")
#: The actions the node logs today; others may be added (lowercase words and dashes).
ACTIONS: tuple[str, ...] = (
    "search", "search-answer", "fetch", "fetch-answer", "report", "report-answer",
    "consent-add", "consent-withdraw", "consent-import",
    "break-the-glass", "ingest-start", "ingest", "join", "index-publish", "audit-export",
    "user-add", "user-remove", "sign-in",
)  # fmt: skip
_ACTION = re.compile(r"^[a-z][a-z0-9-]{0,63}$")


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One line of the audit log (fields: see the module docstring).

    Build it with what the caller knows; ``append`` sets ``seq`` and ``time``
    (from the log's clock, replacing any value given) and an ``event_id``
    when none is given, and returns the record as stored.
    """

    action: str
    outcome: Outcome
    side: Side
    outcome_reason: str = ""
    patient_key: int | None = None
    pseudonym: str = ""  # hex
    document_ids: list[str] = field(default_factory=list)
    clinician_id: str = ""
    role: str = ""
    organisation_id: str = ""
    on_behalf_of: str = ""
    requesting_node: str = ""
    requesting_address: str = ""
    purpose_of_use: str = ""
    consent_rule: str = ""
    break_the_glass: bool = False
    break_the_glass_reason: str = ""
    correlation_id: str = ""
    event_id: str = ""
    time: str = ""
    seq: int = 0  # 0 until appended


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """``records`` verified intact, in order; ``first_problem`` names where the chain breaks."""

    ok: bool
    records: int
    first_problem: str | None = None
    #: Of the last intact record: kept elsewhere, it shows records cut off the end.
    last_hash: bytes = field(default=b"", compare=False)


class AuditDatabase(Protocol):
    """What the log needs of a database: ``transmural.database.Database`` has it."""

    def read(self, name: str) -> AbstractAsyncContextManager[aiosqlite.Connection]: ...

    async def run(
        self, name: str, work: Callable[[sqlite3.Connection], Result], *, write: bool
    ) -> Result: ...


_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(AuditRecord))
#: Stored columns, in the order every query here names them; ``prev_hash`` and ``hash`` follow.
_COLUMNS: tuple[str, ...] = ("seq", *(name for name in _FIELDS if name != "seq"))
_SELECT = f"SELECT {', '.join(_COLUMNS)}, prev_hash, hash FROM audit_log"
_INSERT = (
    f"INSERT INTO audit_log ({', '.join((*_COLUMNS, 'prev_hash', 'hash'))}) "
    f"VALUES ({', '.join('?' * (len(_COLUMNS) + 2))})"
)
_LAST = "SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1"


class AuditLog:
    """The hash-chained log in the node's database (see module doc)."""

    def __init__(self, db: AuditDatabase, clock: Clock) -> None:
        self._db = db
        self._clock = clock
        #: Records handed to ``append`` and not yet written, with their callers' futures.
        self._waiting: list[tuple[AuditRecord, asyncio.Future[AuditRecord]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def append(self, record: AuditRecord) -> AuditRecord:
        """Write ``record`` at the end of the chain and return it as stored.

        ValueError for a malformed record (a bug in the caller); Unavailable
        when it cannot be written, with the chain left as it was. A started
        append finishes even if its caller is cancelled (a client hanging
        up): logging an access that then did not happen is safe, and a
        transaction cut off half-way could leave the shared connection in it.

        Appends that arrive while a write is running are written together
        by the next one, in one transaction (group commit): a search
        answered by twenty facilities costs a few transactions, not twenty.
        """
        record = stamped(record, self._clock)
        written: asyncio.Future[AuditRecord] = asyncio.get_running_loop().create_future()
        written.add_done_callback(_observed)
        self._waiting.append((record, written))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_waiting())
        return await asyncio.shield(written)

    async def _write_waiting(self) -> None:
        """Write what is waiting, a batch per transaction, until nothing is."""
        while self._waiting:
            batch = self._waiting[:MAX_BATCH]
            del self._waiting[:MAX_BATCH]
            try:
                stored = await self._write([record for record, _ in batch])
            except Unavailable as error:
                for _, written in batch:
                    written.set_exception(Unavailable(str(error)))
            else:
                for (_, written), record in zip(batch, stored, strict=True):
                    written.set_result(record)

    async def _write(self, records: list[AuditRecord]) -> list[AuditRecord]:
        try:
            return await self._db.run(
                "audit_append", functools.partial(_chain_onto_log, records), write=True
            )
        except Exception as error:
            log.warning("%d audit record(s) not written: %s", len(records), error)
            raise Unavailable(f"the audit log cannot be written: {error}") from error

    async def verify(self) -> VerifyReport:
        """Walk the whole chain in ``seq`` order; report the first broken or missing record.

        Reads ``VERIFY_BATCH`` rows per query and hashes them off the event
        loop, so a log of millions of records neither fills memory nor
        stalls a running node.
        """
        checker = _ChainChecker()
        while True:
            async with self._db.read("audit_verify") as db:
                rows = list(
                    await db.execute_fetchall(
                        f"{_SELECT} WHERE seq > ? ORDER BY seq LIMIT ?",
                        (checker.last_seq, VERIFY_BATCH),
                    )
                )
            problem = await asyncio.to_thread(checker.check, rows)
            if problem is not None:
                return VerifyReport(False, checker.intact, problem, checker.last_hash)
            if len(rows) < VERIFY_BATCH:
                return VerifyReport(True, checker.intact, last_hash=checker.last_hash)

    async def export(self, patient_key: int | None, pseudonym_hex: str) -> list[AuditRecord]:
        """Every record about one patient, by local key or by pseudonym, oldest first."""
        conditions: list[str] = []
        params: list[Any] = []
        if patient_key is not None:
            conditions.append("patient_key = ?")
            params.append(patient_key)
        if pseudonym_hex:
            # "!= ''" lets SQLite use the partial index on pseudonym.
            conditions.append("(pseudonym = ? AND pseudonym != '')")
            params.append(pseudonym_hex.lower())
        if not conditions:
            raise ValueError("export needs a patient key or a pseudonym")
        async with self._db.read("audit_export") as db:
            rows = await db.execute_fetchall(
                f"{_SELECT} WHERE {' OR '.join(conditions)} ORDER BY seq", params
            )
        return [_record(row) for row in rows]


def chain_hash(prev_hash: bytes, record: AuditRecord) -> bytes:
    """SHA-256 over the previous hash and the record's canonical JSON."""
    return hashlib.sha256(prev_hash + canonical_json(record)).digest()


def canonical_json(record: AuditRecord) -> bytes:
    """Every field, ``seq`` included: sorted keys, no spaces, UTF-8."""
    return json.dumps(
        {name: getattr(record, name) for name in _FIELDS},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode("utf-8")


class _ChainChecker:
    """The state of one ``verify`` walk, carried from batch to batch."""

    def __init__(self) -> None:
        self.last_seq = 0
        self.last_hash = GENESIS
        self.intact = 0

    def check(self, rows: Sequence[sqlite3.Row]) -> str | None:
        for row in rows:
            seq = row[0]
            problem = self._problem(row)
            if problem is not None:
                return f"seq {seq}: {problem}"
            self.last_seq, self.last_hash = seq, bytes(row[-1])
            self.intact += 1
        return None

    def _problem(self, row: sqlite3.Row) -> str | None:
        seq, prev_hash, stored_hash = row[0], row[-2], row[-1]
        expected = self.last_seq + 1
        if seq != expected:
            missing = f"seq {expected}" if seq == expected + 1 else f"seq {expected}-{seq - 1}"
            return f"record {missing} is missing (deleted); the chain resumes here"
        if not isinstance(prev_hash, bytes) or prev_hash != self.last_hash:
            if seq == 1:
                return "prev_hash is not the genesis value (the start of the chain was replaced)"
            return (
                f"prev_hash does not match the hash of seq {seq - 1} "
                "(a record was deleted, replaced or moved)"
            )
        try:
            record = _record(row)
            recomputed = chain_hash(prev_hash, record)  # TypeError for a value of a wrong type
        except (ValueError, TypeError) as error:
            return f"the record is unreadable ({error}): it was changed"
        if _row(record) != tuple(row[: len(_COLUMNS)]):
            return "the record is not stored in canonical form: it was changed"
        if not isinstance(stored_hash, bytes) or recomputed != stored_hash:
            return "hash mismatch: the record was changed"
        return None


def _observed(write: asyncio.Future[AuditRecord]) -> None:
    """Retrieve an append's error: a cancelled caller will not (it is logged)."""
    if not write.cancelled():
        write.exception()


def _check(record: AuditRecord) -> None:
    if not _ACTION.match(record.action):
        raise ValueError(f"audit action {record.action!r}: use lowercase words and dashes")
    if record.outcome not in OUTCOMES:
        raise ValueError(f"audit outcome {record.outcome!r} is not one of {OUTCOMES}")
    if record.side not in SIDES:
        raise ValueError(f"audit side {record.side!r} is not one of {SIDES}")
    if record.pseudonym and not re.fullmatch(r"[0-9a-f]+", record.pseudonym):
        raise ValueError("audit pseudonym must be lowercase hex")
    if not all(isinstance(d, str) for d in record.document_ids):
        raise ValueError("audit document_ids must be strings")


def stamped(record: AuditRecord, clock: Clock) -> AuditRecord:
    """``record`` checked (ValueError if malformed), with its time and an event id."""
    _check(record)
    return dataclasses.replace(
        record,
        event_id=record.event_id or uuid.uuid4().hex,
        time=_timestamp(clock.now()),
        document_ids=list(record.document_ids),
    )


async def chain_within(db: aiosqlite.Connection, records: list[AuditRecord]) -> list[AuditRecord]:
    """Chain ``stamped`` records onto the log inside the caller's open transaction.

    For a change that must not exist without its record (a consent): both
    commit together, or the caller's transaction rolls both back.
    Unavailable when the log cannot be written.
    """
    try:
        rows = list(await db.execute_fetchall(_LAST))
        stored, values = _chained(records, rows)
        await db.executemany(_INSERT, values)
    except sqlite3.Error as error:
        log.warning("%d audit record(s) not written: %s", len(records), error)
        raise Unavailable(f"the audit log cannot be written: {error}") from error
    return stored


def _timestamp(epoch_seconds: float) -> str:
    """UTC ISO 8601 to the millisecond: asking and answering lines of one search line up."""
    return datetime.fromtimestamp(epoch_seconds, UTC).isoformat(timespec="milliseconds")


def _chain_onto_log(records: list[AuditRecord], db: sqlite3.Connection) -> list[AuditRecord]:
    """Number and hash ``records`` after the last one stored, and insert them.

    Runs on the database's thread inside the append's transaction, so the
    last hash cannot change between reading it and inserting after it.
    """
    stored, values = _chained(records, db.execute(_LAST).fetchall())
    _insert(db, values)
    return stored


def _chained(
    records: list[AuditRecord], last: Sequence[Sequence[Any]]
) -> tuple[list[AuditRecord], list[tuple[Any, ...]]]:
    """Records numbered and hashed after ``last`` (the _LAST row, if any), and their rows."""
    seq, prev_hash = (last[0][0], bytes(last[0][1])) if last else (0, GENESIS)
    stored, values = [], []
    for record in records:
        seq += 1
        chained = dataclasses.replace(record, seq=seq)
        hash_ = chain_hash(prev_hash, chained)
        stored.append(chained)
        values.append((*_row(chained), prev_hash, hash_))
        prev_hash = hash_
    return stored, values


def _insert(db: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    """Insert stored rows (columns, prev_hash, hash) in one statement execution."""
    db.executemany(_INSERT, rows)


def _row(record: AuditRecord) -> tuple[Any, ...]:
    """The stored column values of a record, in ``_COLUMNS`` order."""
    values = {name: getattr(record, name) for name in _COLUMNS}
    values["document_ids"] = json.dumps(record.document_ids, separators=(",", ":"))
    values["break_the_glass"] = int(record.break_the_glass)
    return tuple(values[name] for name in _COLUMNS)


def _record(row: sqlite3.Row | Sequence[Any]) -> AuditRecord:
    """A stored row back as a record; ValueError/TypeError if it cannot be one."""
    values = dict(zip(_COLUMNS, row, strict=False))
    documents = json.loads(values["document_ids"])
    if not isinstance(documents, list):
        raise ValueError("document_ids is not a list")
    if values["break_the_glass"] not in (0, 1):
        raise ValueError("break_the_glass is not 0 or 1")
    values["document_ids"] = documents
    values["break_the_glass"] = bool(values["break_the_glass"])
    return AuditRecord(**values)
