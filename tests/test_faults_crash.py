"""A node killed with SIGKILL in the middle of an ingest loses no bundle halfway.

``transmural-admin ingest`` runs as a real process on a node.toml; it is
killed once the first bundles are in. Every bundle must then be fully in or
not at all, and the same ingest run again must end exactly where one clean
ingest ends, with nothing twice.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from node.config import NodeConfig
from node.ingest import ingest_folder
from node.store import NodeStore
from transmural.identifiers import US_SSN_SYSTEM
from transmural.pseudonym import (
    Pseudonymiser,
    new_network_key,
    read_network_key,
    write_network_key,
)

SMART = Path(__file__).resolve().parents[2] / "shared" / "data" / "synthea-smart-r4" / "bundles"
PATIENT_BUNDLES = 16
KILL_AFTER_PATIENTS = 3


def _subset(target: Path) -> Path:
    if not SMART.is_dir():
        pytest.fail(f"test data {SMART} is missing: the project expects ../shared/data")
    target.mkdir()
    files = sorted(SMART.glob("*.json"), key=lambda p: p.stat().st_size)
    info = [p for p in files if p.name.startswith(("hospital", "practitioner"))]
    patients = [p for p in files if p not in info][:PATIENT_BUNDLES]
    for path in info + patients:
        shutil.copy(path, target / path.name)
    return target


def _per_patient(database: Path) -> dict[str, tuple[int, int, int]]:
    """fhir id -> (resources, documents, document chunks) of each stored patient."""
    with sqlite3.connect(database) as conn:
        rows = conn.execute(
            "SELECT p.fhir_id,"
            " (SELECT count(*) FROM resources r WHERE r.patient_key = p.patient_key),"
            " (SELECT count(*) FROM documents d WHERE d.patient_key = p.patient_key),"
            " (SELECT count(*) FROM document_chunks c JOIN documents d"
            "   ON c.document_id = d.document_id WHERE d.patient_key = p.patient_key)"
            " FROM patients p"
        ).fetchall()
    return {fhir_id: (r, d, c) for fhir_id, r, d, c in rows}


def _totals(database: Path) -> dict[str, int]:
    with sqlite3.connect(database) as conn:
        totals = {
            table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in ("patients", "resources", "documents", "document_chunks")
        }
        totals["outbox pseudonyms"] = conn.execute(
            "SELECT count(DISTINCT pseudonym) FROM index_outbox"
        ).fetchone()[0]
    return totals


def _patients_in(database: Path) -> int:
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=1) as conn:
            return int(conn.execute("SELECT count(*) FROM patients").fetchone()[0])
    except sqlite3.Error:
        return 0  # not created or migrated yet


def _ingest(config: Path, folder: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tools.admin", "ingest", "--config", str(config), str(folder)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def test_sigkill_mid_ingest_leaves_whole_bundles_and_reingest_adds_no_duplicates(
    tmp_path: Path,
) -> None:
    folder = _subset(tmp_path / "bundles")
    key = tmp_path / "network.key"
    write_network_key(key, new_network_key())
    node = tmp_path / "node"
    node.mkdir()
    config = NodeConfig(
        node_id="node-1", organisation_name="Test", registry="127.0.0.1:1",
        database=node / "node.db", network_key_file=key, insecure_dev=True,
        national_system=US_SSN_SYSTEM,
    )  # fmt: skip
    toml = node / "node.toml"
    toml.write_text(config.to_toml(node))

    # What one clean ingest of the same folder stores.
    reference = tmp_path / "reference.db"

    async def clean() -> None:
        store = await NodeStore.open(reference)
        try:
            _, errors = await ingest_folder(
                store, folder, Pseudonymiser(read_network_key(key)), US_SSN_SYSTEM
            )
            assert not errors
        finally:
            await store.close()

    asyncio.run(clean())
    expected = _per_patient(reference)
    assert len(expected) == PATIENT_BUNDLES

    process = _ingest(toml, folder)
    deadline = time.monotonic() + 60
    while _patients_in(config.database) < KILL_AFTER_PATIENTS:
        assert process.poll() is None, process.communicate()[0].decode(errors="replace")
        assert time.monotonic() < deadline, "the ingest made no progress"
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL

    crashed = _per_patient(config.database)
    assert KILL_AFTER_PATIENTS <= len(crashed) < PATIENT_BUNDLES, "killed too late to prove much"
    for fhir_id, counts in crashed.items():
        assert counts == expected[fhir_id], f"patient {fhir_id} is in only partly"
    with sqlite3.connect(config.database) as db:
        actions = [row[0] for row in db.execute("SELECT action FROM audit_log ORDER BY seq")]
    assert actions == ["ingest-start"]  # the killed ingest left its trace, though not its end

    again = _ingest(toml, folder)
    output = again.communicate(timeout=120)[0].decode(errors="replace")
    assert again.returncode == 0, output
    assert _per_patient(config.database) == expected
    assert _totals(config.database) == _totals(reference)
