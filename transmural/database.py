"""One SQLite file behind one aiosqlite connection: what the node and registry stores share.

The connection's worker thread runs calls in order, so it is the single
writer. An ``asyncio.Lock`` keeps the statements of one transaction (or one
multi-query read) together: no other call lands between them across awaits.
Every write is one named ``BEGIN IMMEDIATE`` transaction, so it takes the
write lock at its start, and another process writing the same file (the
admin CLI beside the node server) waits ``busy_timeout`` instead of failing
half-way. WAL lets that process read while we write.

Each statement is a hop to that thread and back (~50-150 us). Where one
answer needs several statements on a hot path, ``run`` takes a plain
function of the ``sqlite3`` connection and runs all of it on the worker
thread in one hop (a write inside its own BEGIN IMMEDIATE ... COMMIT).

The schema is a list of numbered SQL scripts: ``migrations[n - 1]`` takes a
database from version ``n - 1`` to ``n``. ``Database.open`` applies the
missing ones in one transaction and records each in ``schema_version``, so two
processes opening one file at once cannot both apply a script. A database
newer than the code, or a file that is not a usable database, is a
ConfigError naming the file.

Whose database a file is stands in SQLite's ``application_id`` header
field, so a node's database given to the registry (or the other way
round, or another program's SQLite file) is refused as such before any
migration touches it. A file from before the mark is recognised by the
tables of its first migration, then marked.

``Database.open_read_only`` is for commands that only look: it opens an
existing file with SQLite's ``mode=ro``, so it cannot create, migrate or
change it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from transmural.clock import Clock, utc_iso
from transmural.errors import ConfigError

log = logging.getLogger(__name__)

Result = TypeVar("Result")

#: SQLite ``application_id`` of each kind of database ("TMND", "TMRG").
APPLICATION_IDS = {"node": 0x544D4E44, "registry": 0x544D5247}

_CREATED_TABLE = re.compile(r"CREATE TABLE (?:IF NOT EXISTS )?(\w+)", re.IGNORECASE)

_SCHEMA_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS schema_version (
    version    INTEGER PRIMARY KEY NOT NULL,
    applied_at TEXT NOT NULL
)
"""


class Database:
    """An open, migrated SQLite database; get one with ``Database.open``."""

    def __init__(
        self, connection: aiosqlite.Connection, clock: Clock, path: Path | str, owner: str
    ) -> None:
        self._connection = connection
        self._clock = clock
        self._owner = owner
        self._path = path
        #: How errors and logs name this database: "node database /var/node.db".
        self._name = f"{owner} database {path}"
        self._lock = asyncio.Lock()

    @property
    def path(self) -> Path | str:
        return self._path

    @classmethod
    async def open(
        cls,
        path: Path | str,
        migrations: Sequence[str],
        clock: Clock,
        *,
        owner: str,
        busy_timeout_ms: int,
        cache_mib: int | None = None,
    ) -> Database:
        """Open (creating if needed) and migrate the database at ``path``.

        ``owner`` names whose database it is ("node", "registry") in errors
        and logs. ``cache_mib`` sets SQLite's page cache (default: 2 MiB),
        so a large index keeps more of its B-tree in memory. ConfigError
        when the file cannot be opened or used, or its schema is newer than
        ``migrations``.
        """
        try:
            # Open once in plain sqlite3 first: aiosqlite's own failed connect
            # leaves its worker thread to report into a loop that may be gone.
            await asyncio.to_thread(_try_open, str(path))
            connection = await aiosqlite.connect(str(path), isolation_level=None)
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot open {owner} database {path}: {exc}") from exc
        except OSError as exc:
            raise ConfigError(
                f"cannot open {owner} database {path}: {exc.strerror or exc}"
            ) from exc
        database = cls(connection, clock, path, owner)
        try:
            await database._configure(busy_timeout_ms, cache_mib)
            await database._migrate(migrations)
        except sqlite3.Error as exc:
            await connection.close()
            raise ConfigError(f"cannot use {owner} database {path}: {exc}") from exc
        except BaseException:
            await connection.close()
            raise
        return database

    @classmethod
    async def open_read_only(
        cls, path: Path | str, migrations: Sequence[str], clock: Clock, *, owner: str
    ) -> Database:
        """Open ``owner``'s existing database at ``path`` read-only (SQLite ``mode=ro``).

        For commands that only look, beside a running server: nothing is
        created, marked or migrated, and SQLite itself refuses any write.
        ConfigError when the file is missing, not ``owner``'s database, or not
        at the schema version ``migrations`` make (an older one is brought up
        to date by the server of this version, which a reader must not do).
        """
        uri = await asyncio.to_thread(_probe_read_only, Path(path), owner, len(migrations))
        connection = await aiosqlite.connect(uri, uri=True, isolation_level=None)
        return cls(connection, clock, path, owner)

    async def close(self) -> None:
        """Close the connection once any transaction in progress is done."""
        async with self._lock:
            await self._connection.close()

    @asynccontextmanager
    async def transaction(self, name: str) -> AsyncIterator[aiosqlite.Connection]:
        """One named write transaction; rolled back if anything in it fails."""
        async with self._lock:
            started = self._clock.monotonic()
            try:
                # Inside the try: a task cancelled while BEGIN runs (on
                # aiosqlite's thread) must still roll it back, or every later
                # write on this connection fails.
                await self._connection.execute("BEGIN IMMEDIATE")
                yield self._connection
                await self._connection.execute("COMMIT")
            except BaseException:
                await self._rollback(name)
                raise
            log.debug(
                "transaction %s took %.1f ms", name, (self._clock.monotonic() - started) * 1000
            )

    @asynccontextmanager
    async def read(self, name: str) -> AsyncIterator[aiosqlite.Connection]:
        """A named read of several queries; never sees half of a write of ours."""
        async with self._lock:
            started = self._clock.monotonic()
            yield self._connection
            log.debug("read %s took %.1f ms", name, (self._clock.monotonic() - started) * 1000)

    async def run(
        self, name: str, work: Callable[[sqlite3.Connection], Result], *, write: bool
    ) -> Result:
        """``work(connection)`` on the connection's thread, in one hop; its result.

        With ``write`` it runs inside one BEGIN IMMEDIATE transaction that
        commits when ``work`` returns and rolls back if it raises. The whole
        transaction runs on the worker thread, so it ends there even if the
        awaiting task is cancelled half-way: the connection is never left in
        it. ``work`` must not block on anything but SQLite.
        """
        job = partial(_in_transaction, work) if write else work
        async with self._lock:
            started = self._clock.monotonic()
            # aiosqlite's own primitive (every public call of it goes through
            # _execute); pinned in pyproject, and exercised by the tests.
            result: Result = await self._connection._execute(job, self._connection._conn)
            log.debug("run %s took %.1f ms", name, (self._clock.monotonic() - started) * 1000)
            return result

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """The rows of one query."""
        async with self._lock:
            return list(await self._connection.execute_fetchall(sql, params))

    async def _rollback(self, name: str) -> None:
        try:
            await self._connection.execute("ROLLBACK")
        except sqlite3.Error:
            # A failed COMMIT may already have ended the transaction.
            log.debug("transaction %s had nothing to roll back", name)
        else:
            log.debug("transaction %s rolled back", name)

    async def _configure(self, busy_timeout_ms: int, cache_mib: int | None) -> None:
        db = self._connection
        await db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        if cache_mib is not None:
            await db.execute(f"PRAGMA cache_size = {-1024 * int(cache_mib)}")  # KiB when < 0
        rows = list(await db.execute_fetchall("PRAGMA journal_mode = WAL"))
        mode = str(rows[0][0]).lower() if rows else ""
        if mode not in ("wal", "memory"):
            raise ConfigError(f"the {self._name} cannot use write-ahead logging (got {mode!r})")
        await db.execute("PRAGMA synchronous = NORMAL")
        await db.execute("PRAGMA foreign_keys = ON")

    async def _migrate(self, migrations: Sequence[str]) -> None:
        """Bring the schema to ``len(migrations)`` in one transaction."""
        latest = len(migrations)
        async with self.transaction("migrate") as db:
            await self._check_kind(db, migrations)
            await db.execute(_SCHEMA_VERSION_TABLE)
            rows = list(await db.execute_fetchall("SELECT max(version) FROM schema_version"))
            current = int(rows[0][0] or 0)
            if current > latest:
                raise ConfigError(
                    f"the {self._name} has schema version {current}, newer than this "
                    f"{self._owner} understands ({latest}): upgrade the software"
                )
            applied_at = utc_iso(self._clock.now())
            for version in range(current + 1, latest + 1):
                for statement in statements(migrations[version - 1]):
                    await db.execute(statement)
                await db.execute(
                    "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                    (version, applied_at),
                )
                log.info("%s migrated to schema version %d", self._name, version)

    async def _check_kind(self, db: aiosqlite.Connection, migrations: Sequence[str]) -> None:
        """ConfigError unless the file is empty or this owner's; marks it as this owner's.

        An owner without an id (a test's) neither checks nor marks.
        """
        ours = APPLICATION_IDS.get(self._owner)
        marked = int(next(iter(await db.execute_fetchall("PRAGMA application_id")))[0])
        if ours is None or marked == ours:
            return
        if marked:
            other = next((o for o, i in APPLICATION_IDS.items() if i == marked), None)
            what = f"a {other}'s database" if other else "another program's database"
            raise ConfigError(
                f"{self._path} is {what}, not a {self._owner}'s: "
                f"give the {self._owner} its own database file"
            )
        tables = {
            str(row[0])
            for row in await db.execute_fetchall(
                "SELECT name FROM sqlite_master WHERE type = 'table'"
            )
        }
        expected = set(_CREATED_TABLE.findall(migrations[0])) if migrations else set()
        if tables - {"schema_version"} and not expected <= tables:
            missing = ", ".join(sorted(expected - tables)[:3])
            raise ConfigError(
                f"{self._path} holds tables, but not a {self._owner}'s (no {missing}): "
                f"is it another program's database? Give the {self._owner} its own file"
            )
        await db.execute(f"PRAGMA application_id = {ours}")


def statements(script: str) -> list[str]:
    """Split a migration into statements (``executescript`` would commit mid-transaction)."""
    found: list[str] = []
    pending = ""
    for line in script.splitlines(keepends=True):
        if not pending and (not line.strip() or line.lstrip().startswith("--")):
            continue
        pending += line
        if sqlite3.complete_statement(pending):
            found.append(pending.strip())
            pending = ""
    if pending.strip():
        raise ValueError(f"incomplete SQL statement in migration: {pending.strip()[:60]!r}")
    return found


def holds_a_database(path: Path) -> bool:
    """A non-empty file: an empty one (or none) SQLite would take as a new database.

    For commands that must find the server's database, never start one.
    """
    return path.is_file() and path.stat().st_size > 0


def _try_open(path: str) -> None:
    """Create a new file owner-only (it holds patient data or tokens), then open it.

    SQLite gives its -wal and -shm files the database file's permissions.
    """
    if path != ":memory:" and not os.path.exists(path):
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    sqlite3.connect(path).close()


def _probe_read_only(path: Path, owner: str, latest: int) -> str:
    """The ``mode=ro`` URI of ``path`` once it is known to be ``owner``'s, at ``latest``."""
    if not path.is_file():
        raise ConfigError(f"there is no {owner} database {path}")
    uri = f"{path.resolve().as_uri()}?mode=ro"
    try:
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
            marked = int(db.execute("PRAGMA application_id").fetchone()[0])
            current = _schema_version(db)
    except sqlite3.Error as exc:
        raise ConfigError(f"cannot read {owner} database {path}: {exc}") from exc
    if marked not in (0, APPLICATION_IDS.get(owner, marked)) or not current:
        other = next((o for o, i in APPLICATION_IDS.items() if i == marked), None)
        what = f"a {other}'s database" if other else "empty, or another program's database"
        raise ConfigError(f"{path} is not a {owner} database: it is {what}")
    if current != latest:
        cure = "upgrade the software" if current > latest else f"start the {owner} once"
        raise ConfigError(
            f"the {owner} database {path} has schema version {current}, this {owner} "
            f"reads version {latest}: {cure}"
        )
    return uri


def _schema_version(db: sqlite3.Connection) -> int:
    """The version a database's migrations reached; 0 when it has none."""
    if not db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
    ).fetchall():
        return 0
    return int(db.execute("SELECT max(version) FROM schema_version").fetchone()[0] or 0)


def _in_transaction(work: Callable[[sqlite3.Connection], Result], db: sqlite3.Connection) -> Result:
    """``work`` inside BEGIN IMMEDIATE ... COMMIT, rolled back if anything raises."""
    db.execute("BEGIN IMMEDIATE")
    try:
        result = work(db)
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return result
