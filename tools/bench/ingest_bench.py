"""Ingest of the Synthea set into a node store, beside json.load + plain sqlite3."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import resource
import sqlite3
import time
from multiprocessing.connection import Connection
from pathlib import Path

from node.ingest import ingest_folder
from node.preparer import worker_count
from node.store import NodeStore
from tools.bench.common import Figure
from tools.bench.processes import resident_bytes
from transmural.identifiers import US_SSN_SYSTEM
from transmural.pseudonym import Pseudonymiser, new_network_key

MIB = 1024 * 1024
SYNTHEA = Path(__file__).resolve().parents[3] / "shared" / "data" / "synthea-smart-r4" / "bundles"


def plain_ingest(path: Path, files: list[Path]) -> tuple[int, float]:
    """(resources, seconds): json.load each bundle, executemany its resources, commit per file."""
    started = time.perf_counter()
    count = 0
    with sqlite3.connect(path, isolation_level=None) as db:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute(
            "CREATE TABLE resources (resource_key INTEGER PRIMARY KEY, resource_type TEXT NOT NULL,"
            " fhir_id TEXT NOT NULL, json TEXT NOT NULL, UNIQUE (resource_type, fhir_id))"
        )
        for file in files:
            with file.open("rb") as handle:
                bundle = json.load(handle)
            rows = [
                (r["resourceType"], r.get("id", ""), json.dumps(r))
                for r in (e["resource"] for e in bundle.get("entry", []) if "resource" in e)
            ]
            db.execute("BEGIN IMMEDIATE")
            db.executemany(
                "INSERT OR REPLACE INTO resources (resource_type, fhir_id, json) VALUES (?, ?, ?)",
                rows,
            )
            db.execute("COMMIT")
            count += len(rows)
    return count, time.perf_counter() - started


async def ingest(root: Path, reps: int, limit: int | None = None) -> Figure:
    """FHIR resources/s through ``node.ingest`` (pseudonymising, publishing to the outbox)."""
    files = sorted(SYNTHEA.glob("*.json"))[:limit]
    figure = Figure(
        f"Ingest, Synthea smart set ({len(files)} bundles)", "resources/s",
        "json.load + plain sqlite3 executemany of the resources", 0.5,
    )  # fmt: skip
    for rep in range(reps):
        count, elapsed = plain_ingest(root / f"plain-{rep}.db", files)
        figure.baselines.append(count / elapsed)
        store = await NodeStore.open(root / f"node-{rep}.db")
        started = time.perf_counter()
        try:
            reports, errors = await ingest_folder(
                store, files[0].parent if limit is None else _subset(root, files),
                Pseudonymiser(new_network_key()), US_SSN_SYSTEM,
            )  # fmt: skip
            elapsed = time.perf_counter() - started
        finally:
            await store.close()
        assert not errors, errors[:3]
        figure.values.append(sum(r.resources for r in reports) / elapsed)
        print(
            f"  ingest rep {rep + 1}: {figure.values[-1]:,.0f}/s vs {figure.baselines[-1]:,.0f}/s"
        )
    folder = files[0].parent if limit is None else _subset(root, files)
    peak, after, workers = await _memory_of_ingest(root / "memory.db", folder)
    megabytes = sum(f.stat().st_size for f in files) / 1e6
    figure.notes = (
        "target 0.5x is our own guess (the issue sets none); the node also pseudonymises, "
        "extracts patients and documents and fills the publish outbox. Memory, in a fresh "
        f"process ingesting the {megabytes:.0f} MB of bundles: peak resident "
        f"{peak / MIB:.0f} MiB, {after / MIB:.0f} MiB resident afterwards"
        + (f"; each of its {worker_count(len(files))} worker processes preparing bundles "
           f"peaked at {workers / MIB:.0f} MiB at most" if workers else "")
    )  # fmt: skip
    return figure


async def _memory_of_ingest(database: Path, folder: Path) -> tuple[int, int, int]:
    """(peak, final) resident bytes of a new process that ingests ``folder``, and the
    largest peak of its worker processes (0 when it used none)."""
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(target=_ingest_and_report, args=(database, folder, theirs))
    process.start()
    try:
        if not await asyncio.to_thread(ours.poll, 300):
            raise RuntimeError("the ingest process did not finish within 300 s")
        peak, after, workers = ours.recv()
    finally:
        await asyncio.to_thread(process.join, 10)
    return peak, after, workers


def _ingest_and_report(database: Path, folder: Path, conn: Connection) -> None:
    async def main() -> None:
        store = await NodeStore.open(database)
        try:
            _, errors = await ingest_folder(
                store, folder, Pseudonymiser(new_network_key()), US_SSN_SYSTEM
            )
        finally:
            await store.close()
        assert not errors, errors[:3]

    asyncio.run(main())
    # Workers were joined when the ingest ended: their peaks count as children's.
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    conn.send((resident_bytes(os.getpid(), "VmHWM"), resident_bytes(os.getpid()), workers))


def _subset(root: Path, files: list[Path]) -> Path:
    folder = root / "subset"
    folder.mkdir(exist_ok=True)
    for file in files:
        target = folder / file.name
        if not target.exists():
            target.symlink_to(file)
    return folder
