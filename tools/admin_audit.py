"""``transmural-admin audit verify|export``: check a node's audit chain, read a patient's history.

``verify`` opens the database read-only (SQLite ``mode=ro``): it never
creates, migrates or writes the file it is asked to check, so it can run
beside the live node, or on a copy taken as evidence. ``export`` is what a
patient is entitled to see: every recorded access to their record at this
node, as a table or JSON. Reading someone's access history is itself an
access, so ``export`` first logs an ``audit-export`` record (by the OS user
running it) and refuses to export if that line cannot be written.

Exit codes: 0 done (chain intact); 1 the chain is broken (verify) or no such
patient (export); 2 no usable database, bad config or identifier.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import getpass
import json
import os
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import NoReturn, TypeVar

import aiosqlite

from node.audit import AuditLog, AuditRecord, Outcome
from node.config import NodeConfig
from node.store import NodeStore
from transmural.clock import SystemClock
from transmural.errors import ConfigError, Unavailable
from transmural.identifiers import Identifier, canonical_system, parse_token
from transmural.process import given_path
from transmural.pseudonym import Pseudonymiser, read_network_key

T = TypeVar("T")


def add_audit_commands(sub: argparse._SubParsersAction) -> None:
    audit = sub.add_parser("audit", help="verify a node's audit log, export a patient's history")
    actions = audit.add_subparsers(
        dest="audit_command", required=True, metavar="ACTION", help="verify or export"
    )
    verify = actions.add_parser(
        "verify",
        help="check the hash chain; report the first broken or missing record",
        description="Walk the node's audit log in order and check every record's hash and "
        "link. Prints 'ok: N records, chain intact' and the last record's seq and hash "
        "(exit 0), or the first problem (exit 1). "
        "Opens the database read-only. A chain cannot show records cut off its end: keep "
        "the last line printed here elsewhere, to compare with the next run.",
    )
    verify.add_argument(
        "--db", type=given_path, required=True, metavar="NODE_DB", help="the node's database file"
    )
    export = actions.add_parser(
        "export",
        help="one patient's access history: who, from where, when, what, why, outcome",
        description="Every audit record about one patient at this node (by local id or "
        "pseudonym), oldest first, as a table or JSON. Logged itself as 'audit-export'.",
    )
    export.add_argument("--config", type=given_path, required=True, help="the node's TOML config")
    export.add_argument(
        "--patient", required=True, metavar="IDENTIFIER",
        help="system|value or a bare national identifier",
    )  # fmt: skip
    export.add_argument("--json", action="store_true", help="print JSON instead of a table")


async def run(args: argparse.Namespace) -> int:
    if args.audit_command == "verify":
        return await verify(args.db)
    return await export(args.config, args.patient, as_json=args.json)


async def verify(path: Path) -> int:
    async with _read_only(path) as db:
        report = await AuditLog(db, SystemClock()).verify()
    if report.ok:
        print(f"ok: {report.records} records, chain intact")
        if report.records:
            # A chain cannot show records cut off its end; this line, kept elsewhere, can.
            print(f"last: seq {report.records}, hash {report.last_hash.hex()}")
        return 0
    print(f"broken: {report.first_problem} ({report.records} records before it intact)")
    return 1


async def export(config_path: Path, patient_text: str, *, as_json: bool) -> int:
    config = NodeConfig.load(config_path)
    identifier = parse_token(patient_text, config.national_system)
    pseudonymiser = Pseudonymiser(read_network_key(config.network_key_file))
    clock = SystemClock()
    store = await NodeStore.open(config.database, clock, existing=True, node=config.identity)
    try:
        patient = await store.patient_by_identifier(identifier)
        national = _national(identifier, patient.identifier if patient else None, config)
        pseudonym = pseudonymiser.pseudonym(national).hex() if national else ""
        if patient is None and not pseudonym:
            print(
                "transmural-admin: no patient with that identifier at this node "
                "(give the national identifier to find searches for patients held elsewhere)",
                file=sys.stderr,
            )
            return 1
        key = patient.patient_key if patient else None
        log = AuditLog(store.database, clock)
        await log.append(
            AuditRecord(
                "audit-export", "granted", "local", patient_key=key, pseudonym=pseudonym,
                clinician_id=os_user(), organisation_id=config.organisation_id,
                outcome_reason="access history exported with transmural-admin",
            )
        )  # fmt: skip
        records = await log.export(key, pseudonym)
    finally:
        await store.close()
    if as_json:
        print(json.dumps(_history_json(key, pseudonym, records), indent=2))
    else:
        print("\n".join(history_table(records)))
    return 0


#: Columns of the history table and the widest each may get before it is cut.
_TABLE_COLUMNS = (
    ("time (UTC)", 19), ("side", 9), ("action", 16), ("outcome", 7), ("who", 40),
    ("organisation", 24), ("from node", 20), ("purpose", 12), ("docs", 4),
)  # fmt: skip


def history_table(records: list[AuditRecord]) -> list[str]:
    """The history as a patient reads it: one line per access, oldest first."""
    rows = [_table_row(r) for r in records]
    widths = [
        min(limit, max([len(title), *(len(row[i]) for row in rows)]))
        for i, (title, limit) in enumerate(_TABLE_COLUMNS)
    ]
    lines = []
    for cells in [[title for title, _ in _TABLE_COLUMNS] + ["why"], *rows]:
        fixed = [
            _cut(cell, width).ljust(width) for cell, width in zip(cells, widths[:-1], strict=False)
        ]
        count = cells[len(widths) - 1].rjust(widths[-1])  # the document count, right-aligned
        lines.append("  ".join([*fixed, count, cells[-1]]).rstrip())
    return lines


def _table_row(r: AuditRecord) -> list[str]:
    who = f"{r.clinician_id} ({r.role})" if r.role else r.clinician_id
    if r.on_behalf_of:
        who += f" for {r.on_behalf_of}"
    why = "; ".join(
        part
        for part in (
            r.outcome_reason,
            f"consent: {r.consent_rule}" if r.consent_rule else "",
            f"BREAK-THE-GLASS: {r.break_the_glass_reason}" if r.break_the_glass else "",
        )
        if part
    )
    when = r.time[:19].replace("T", " ")
    return [when, r.side, r.action, r.outcome, who, r.organisation_id, r.requesting_node,
            r.purpose_of_use, str(len(r.document_ids)), why]  # fmt: skip


def _history_json(key: int | None, pseudonym: str, records: list[AuditRecord]) -> object:
    return {
        "patient_key": key,
        "pseudonym": pseudonym,
        "records": [dataclasses.asdict(r) for r in records],
    }


def _national(given: Identifier, held: Identifier | None, config: NodeConfig) -> Identifier | None:
    """The national identifier the pseudonym is made of: the patient's, or the one given."""
    if held is not None:
        return held
    return given if given.system == canonical_system(config.national_system) else None


async def record_local(
    store: NodeStore,
    action: str,
    reason: str,
    outcome: Outcome = "granted",
    *,
    patient_key: int | None = None,
    organisation_id: str = "",
) -> None:
    """An operator's action on this node (ingest, user add/remove, a consent read) in its
    audit log; ``patient_key`` puts it in that patient's access history.

    ``reason`` says what was done, never with patient data or a token in it.
    """
    record = AuditRecord(action=action, outcome=outcome, side="local", outcome_reason=reason,
                         clinician_id=os_user(), patient_key=patient_key,
                         organisation_id=organisation_id)  # fmt: skip
    await AuditLog(store.database, SystemClock()).append(record)


def join_record(
    node_id: str, organisation_id: str, registry: str, how: str = "joined", after: str = ""
) -> AuditRecord:
    """A join or re-join in the node's own log: as whom, via which registry, by which OS user."""
    return AuditRecord(
        action="join", outcome="granted", side="local",
        outcome_reason=f"{how} as {node_id} of {organisation_id} via the registry at "
        f"{registry}{after}",
        organisation_id=organisation_id, requesting_node=node_id, clinician_id=os_user(),
    )  # fmt: skip


def os_user() -> str:
    """Who ran the command; containers may have no passwd entry for the uid."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


class _ReadOnlyDatabase:
    """The ``AuditDatabase`` of a file opened ``mode=ro``: reads work, writes refuse."""

    def __init__(self, connection: aiosqlite.Connection) -> None:
        self._connection = connection

    @asynccontextmanager
    async def read(self, name: str) -> AsyncIterator[aiosqlite.Connection]:
        yield self._connection

    async def run(self, name: str, work: Callable[[sqlite3.Connection], T], *, write: bool) -> T:
        raise Unavailable(f"{name}: the database was opened read-only")


@asynccontextmanager
async def _read_only(path: Path) -> AsyncIterator[_ReadOnlyDatabase]:
    """The node database at ``path``, read-only; ConfigError if missing or not one."""
    # Probe in plain sqlite3 first: aiosqlite's failed connect leaves a thread behind.
    uri = await asyncio.to_thread(_probe, path)
    connection = await aiosqlite.connect(uri, uri=True, isolation_level=None)
    try:
        yield _ReadOnlyDatabase(connection)
    except sqlite3.Error as error:
        _unusable(path, error)
    finally:
        await connection.close()


def _probe(path: Path) -> str:
    """The read-only URI of the database at ``path``, once it is known to hold an audit log."""
    if not path.is_file():
        raise ConfigError(f"no node database at {path}")
    uri = f"{path.resolve().as_uri()}?mode=ro"
    try:
        connection = sqlite3.connect(uri, uri=True)
        try:
            rows = connection.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'audit_log'"
            ).fetchall()
        finally:
            connection.close()
    except sqlite3.Error as error:
        _unusable(path, error)
    if not rows:
        raise ConfigError(
            f"{path} holds no audit log: not a node database, or not yet opened by a node "
            "of this version"
        )
    return uri


def _unusable(path: Path, error: sqlite3.Error) -> NoReturn:
    raise ConfigError(f"cannot read node database {path}: {error}") from error
