"""Ingest of the Synthea set into a node store, beside json.load + plain sqlite3."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from node.ingest import ingest_folder
from node.store import NodeStore
from tools.bench.common import Figure
from transmural.identifiers import US_SSN_SYSTEM
from transmural.pseudonym import Pseudonymiser, new_network_key

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
    figure.notes = (
        "target 0.5x is our own guess (the issue sets none); the node also pseudonymises, "
        "extracts patients and documents and fills the publish outbox"
    )
    return figure


def _subset(root: Path, files: list[Path]) -> Path:
    folder = root / "subset"
    folder.mkdir(exist_ok=True)
    for file in files:
        target = folder / file.name
        if not target.exists():
            target.symlink_to(file)
    return folder
