"""Bundles prepared in worker processes: same store as on a thread, clear errors, no orphans."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from node.ingest import ingest_each
from node.preparer import MAX_WORKERS, MIN_FILES_FOR_PROCESSES, BundlePreparer, worker_count
from node.records import IngestReport
from node.store import NodeStore
from tools.synthetic import generate
from transmural.errors import InvalidBundle, Unavailable
from transmural.identifiers import BSN_SYSTEM
from transmural.pseudonym import Pseudonymiser

PSEUDONYMS = Pseudonymiser(b"preparer-test-network-key-32-bytes")
ROOT = Path(__file__).resolve().parents[1]


def children_of(pid: int) -> list[int]:
    """Live child processes of ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(stat[1]) == pid and stat[0] != "Z":
                    found.append(int(entry.name))
    return found


def kill_pool_workers() -> None:
    """SIGKILL this process's multiprocessing workers."""
    for worker in children_of(os.getpid()):
        if b"spawn_main" in Path(f"/proc/{worker}/cmdline").read_bytes():
            os.kill(worker, signal.SIGKILL)


def running(pid: int) -> bool:
    """``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def table_contents(database: Path) -> dict[str, list[tuple[object, ...]]]:
    """What an ingest stored, keyed by table (keys assigned by SQLite left out)."""
    queries = {
        "resources": "SELECT resource_type, fhir_id, json FROM resources ORDER BY 1, 2",
        "documents": "SELECT document_id, sha256, size FROM documents ORDER BY 1",
        "patients": "SELECT pseudonym FROM patients ORDER BY 1",
    }
    with sqlite3.connect(database) as db:
        return {table: db.execute(sql).fetchall() for table, sql in queries.items()}


async def ingest_with(
    files: list[Path], database: Path, workers: int
) -> list[tuple[Path, IngestReport | InvalidBundle]]:
    store = await NodeStore.open(database)
    try:
        results = ingest_each(store, files, PSEUDONYMS, BSN_SYSTEM, workers=workers)
        async with contextlib.aclosing(results):
            return [result async for result in results]
    finally:
        await store.close()


def test_many_files_on_several_cores_get_worker_processes() -> None:
    assert worker_count(MIN_FILES_FOR_PROCESSES - 1, cores=8) == 0  # start-up costs more
    assert worker_count(100, cores=1) == 0  # nothing to run them on
    assert worker_count(100, cores=2) == 2
    assert worker_count(100, cores=64) == MAX_WORKERS


async def test_worker_processes_store_exactly_what_a_thread_stores(tmp_path: Path) -> None:
    folder = tmp_path / "bundles"
    generate(folder, 6, seed=11)
    (folder / "broken.json").write_text('{"resourceType": "Bundle", "type": "transaction"')
    files = sorted(folder.glob("*.json"))
    on_thread = await ingest_with(files, tmp_path / "thread.db", workers=0)
    in_processes = await ingest_with(files, tmp_path / "processes.db", workers=2)

    assert [path.name for path, _ in in_processes] == [path.name for path, _ in on_thread]
    refused = [result for _, result in in_processes if isinstance(result, InvalidBundle)]
    assert len(refused) == 1 and str(refused[0]).startswith("broken.json: not JSON")
    assert sum(isinstance(r, IngestReport) for _, r in in_processes) == 6
    assert table_contents(tmp_path / "processes.db") == table_contents(tmp_path / "thread.db")


async def test_a_worker_that_dies_stops_the_ingest_naming_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "bundles"
    first, second = generate(folder, 2, seed=12)
    async with BundlePreparer(2, workers=1) as preparer:
        await preparer.prepare(first, BSN_SYSTEM, PSEUDONYMS)
        kill_pool_workers()
        await asyncio.sleep(0.2)
        with pytest.raises(Unavailable, match=f"{second.name}: a worker process .* died"):
            await preparer.prepare(second, BSN_SYSTEM, PSEUDONYMS)


WORKERS_THEN_WAIT = """
import asyncio, os, sys, time
from pathlib import Path
from node.preparer import BundlePreparer
from transmural.identifiers import BSN_SYSTEM

async def main():
    async with BundlePreparer(2, workers=2) as preparer:
        await asyncio.gather(*(preparer.prepare(Path(p), BSN_SYSTEM, None) for p in sys.argv[1:]))
        print("prepared", flush=True)
        await asyncio.sleep(60)

asyncio.run(main())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_die_with_an_ingest_killed_outright(tmp_path: Path) -> None:
    bundles = generate(tmp_path / "bundles", 2, seed=13)
    ingest = subprocess.Popen(
        [sys.executable, "-c", WORKERS_THEN_WAIT, *map(str, bundles)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert ingest.stdout is not None and ingest.stdout.readline().strip() == "prepared"
        workers = children_of(ingest.pid)
        assert workers, "the ingest started no worker processes"
        ingest.kill()
        ingest.wait()
        deadline = time.monotonic() + 10
        while any(map(running, workers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        alive = [w for w in workers if running(w)]
        assert not alive, f"worker processes {alive} outlived the killed ingest"
    finally:
        ingest.kill()
