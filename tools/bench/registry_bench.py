"""Registry locate and index publish, against plain gRPC echo and plain sqlite3."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from registry.store import _LOCATE, RegistryStore
from tools.bench.common import (
    ECHO_METHOD,
    Figure,
    closed_loop,
    make_network,
    mint_node,
    p99,
    registry_process,
)
from transmural import pki, transport
from transmural.const import MAX_LOCATE_BATCH, MAX_PUBLISH_BATCH
from transmural.v1 import common_pb2, registry_pb2, registry_pb2_grpc

NODE_ID = "bench-node"
HOLDERS = 5  # nodes in the directory; each entry is held by one of them
IN_FLIGHT = 8  # concurrent calls: most of grpc.aio's throughput is reached by ~8
_UPSERT = """
    INSERT INTO index_entries (pseudonym, node_id, updated_at) VALUES (?, ?, ?)
    ON CONFLICT (pseudonym, node_id) DO UPDATE SET updated_at = excluded.updated_at
"""


def pseudonyms(count: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(32) for _ in range(count)]


async def empty_registry_db(path: Path) -> None:
    """A migrated registry database (the real schema), closed again."""
    store = await RegistryStore.open(path)
    await store.close()


def bulk_load(path: Path, entries: list[bytes]) -> None:
    """Fill the index directly with sqlite3 (setup speed, not a measured figure)."""
    now = time.time()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA synchronous = OFF")
        db.executemany(
            "INSERT INTO nodes VALUES (?, ?, ?, ?, ?, ?)",
            [(f"holder-{i}", f"Facility {i}", f"URA-{i}", f"127.0.0.1:{7400 + i}", now, now)
             for i in range(HOLDERS)],
        )  # fmt: skip
        db.executemany(
            "INSERT INTO index_entries VALUES (?, ?, ?)",
            ((p, f"holder-{i % HOLDERS}", now) for i, p in enumerate(sorted(entries))),
        )
    sqlite3.connect(path).close()


def _any_of(
    call: Callable[[Any], Awaitable[object]], choices: Sequence[object], rng: random.Random
) -> Callable[[], Awaitable[object]]:
    """``call`` with a request drawn at random from ``choices`` each time."""
    return lambda: call(rng.choice(choices))


async def _measure(
    call: Callable[[], Awaitable[object]],
    batch: int,
    rates: list[float],
    p99s: list[float],
    seconds: float,
) -> None:
    calls, elapsed, latencies = await closed_loop(call, IN_FLIGHT, seconds)
    rates.append(calls * batch / elapsed)
    p99s.append(p99(latencies) * 1000)


async def locate(root: Path, entries: int, reps: int, seconds: float) -> list[Figure]:
    """Lookups/s and p99 of single and batched Locate calls, beside plain echo calls."""
    await asyncio.to_thread(root.mkdir, parents=True, exist_ok=True)
    network = make_network(root / "network")
    tls = mint_node(network, NODE_ID)
    db = root / f"locate-{entries}.db"
    await empty_registry_db(db)
    loaded = pseudonyms(entries, seed=1)
    started = time.perf_counter()
    await asyncio.to_thread(bulk_load, db, loaded)
    print(f"  loaded {entries:,} index entries in {time.perf_counter() - started:.1f} s")
    label = f"{entries / 1e6:g}M entries"
    figures = []
    for batch in (1, MAX_LOCATE_BATCH):
        kind = "single" if batch == 1 else f"batched ({batch}/call)"
        figures += [
            Figure(f"Registry Locate, {kind}, {label}", "lookups/s",
                   f"plain gRPC echo of the same request bytes, {IN_FLIGHT} in flight", 0.5),
            Figure(f"Registry Locate p99, {kind}, {label}", "ms",
                   "p99 of the same echo calls", None, higher_is_better=False),
        ]  # fmt: skip
    rng = random.Random(2)
    async with registry_process(db, root / "network") as served:
        registry = transport.open_channel(served.address, tls, pki.REGISTRY_DNS_NAME)
        plain = transport.open_channel(served.echo_address, tls, pki.REGISTRY_DNS_NAME)
        stub = registry_pb2_grpc.RegistryStub(registry)
        echo = plain.unary_unary(ECHO_METHOD)
        try:
            for index, batch in enumerate((1, MAX_LOCATE_BATCH)):
                requests = [
                    registry_pb2.LocateRequest(pseudonyms=rng.sample(loaded, batch))
                    for _ in range(64)
                ]
                raw = [r.SerializeToString() for r in requests]
                answer = await stub.Locate(requests[0])
                assert all(loc.holders for loc in answer.locations), "a loaded entry is missing"
                rate, latency = figures[2 * index], figures[2 * index + 1]
                for _ in range(reps):
                    await _measure(_any_of(stub.Locate, requests, rng), batch,
                                   rate.values, latency.values, seconds)  # fmt: skip
                    await _measure(_any_of(echo, raw, rng), batch,
                                   rate.baselines, latency.baselines, seconds)  # fmt: skip
            batched = figures[2]
            sql = Figure(
                f"Registry Locate, batched ({MAX_LOCATE_BATCH}/call), {label}, vs plain SQLite",
                "lookups/s", "plain sqlite3: the same IN query per batch, one thread, in-process",
                None, values=batched.values,
            )  # fmt: skip
            for _ in range(reps):
                sql.baselines.append(await asyncio.to_thread(plain_locate, db, requests, seconds))
            figures.append(sql)
        finally:
            await registry.close()
            await plain.close()
    figures[2].notes = (
        "the echo carries the 1000 pseudonyms in one message and touches no database; a batched "
        "Locate is bound by SQLite point lookups instead (see the row against plain SQLite)"
    )
    figures[0].notes = f"registry peak RSS {served.peak_rss / 2**20:.0f} MiB (all locate runs)"
    return figures


def scaling(small: list[Figure], large: list[Figure]) -> list[Figure]:
    """The rate at 10x the entries against the rate at 1x: at most 10% slower."""
    figures = []
    for one, ten in ((small[0], large[0]), (small[2], large[2])):
        kind = "single" if "single" in one.name else "batched"
        figures.append(Figure(
            f"Registry Locate, {kind}: {ten.name.rsplit(', ', 1)[1]} against "
            f"{one.name.rsplit(', ', 1)[1]}", "lookups/s", "the same figure at 10x fewer entries",
            0.9, values=ten.values, baselines=one.values,
        ))  # fmt: skip
    return figures


def _remove(root: Path, pattern: str) -> None:
    for path in root.glob(pattern):
        path.unlink()


def plain_locate(path: Path, requests: list[registry_pb2.LocateRequest], seconds: float) -> float:
    """Lookups/s of the registry's own locate query run with plain sqlite3."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        lookups, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            for request in requests:
                chunk = list(request.pseudonyms)
                db.execute(_LOCATE.format(", ".join("?" * len(chunk))), chunk).fetchall()
                lookups += len(chunk)
        return lookups / (time.perf_counter() - started)


def plain_publish(path: Path, batches: list[list[bytes]]) -> float:
    """Seconds for plain sqlite3 executemany of the same rows, one transaction per batch."""
    now = time.time()
    with sqlite3.connect(path, isolation_level=None) as db:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute("INSERT INTO nodes VALUES (?, 'F', 'URA-1', '127.0.0.1:1', ?, ?)",
                   (NODE_ID, now, now))  # fmt: skip
        started = time.perf_counter()
        for batch in batches:
            db.execute("BEGIN IMMEDIATE")
            db.executemany(_UPSERT, [(p, NODE_ID, now) for p in batch])
            db.execute("COMMIT")
        elapsed = time.perf_counter() - started
    return elapsed


async def publish(root: Path, entries: int, reps: int) -> Figure:
    """Entries/s of a bulk Publish over gRPC beside plain sqlite3 executemany."""
    network = make_network(root / "network-publish")
    tls = mint_node(network, NODE_ID)
    figure = Figure(
        f"Index publish, {entries / 1e6:g}M pseudonyms in batches of {MAX_PUBLISH_BATCH:,}",
        "entries/s", "plain sqlite3 executemany of the same rows into the same schema", 0.7,
    )  # fmt: skip
    for rep in range(reps):
        rows = pseudonyms(entries, seed=100 + rep)
        batches = [rows[i : i + MAX_PUBLISH_BATCH] for i in range(0, entries, MAX_PUBLISH_BATCH)]
        requests = [
            registry_pb2.PublishRequest(
                node_id=NODE_ID, entries=[registry_pb2.IndexEntry(pseudonym=p) for p in batch]
            )
            for batch in batches
        ]
        plain_db = root / f"publish-plain-{rep}.db"
        await empty_registry_db(plain_db)
        elapsed = await asyncio.to_thread(plain_publish, plain_db, batches)
        figure.baselines.append(entries / elapsed)
        db = root / f"publish-{rep}.db"
        await empty_registry_db(db)
        async with registry_process(db, root / "network-publish") as served:
            channel = transport.open_channel(served.address, tls, pki.REGISTRY_DNS_NAME)
            stub = registry_pb2_grpc.RegistryStub(channel)
            try:
                node = common_pb2.NodeInfo(node_id=NODE_ID, endpoint="127.0.0.1:1")
                await stub.RegisterNode(registry_pb2.RegisterNodeRequest(node=node))
                started = time.perf_counter()
                for request in requests:
                    await stub.Publish(request)
                figure.values.append(entries / (time.perf_counter() - started))
            finally:
                await channel.close()
        with sqlite3.connect(db) as check:
            stored = check.execute("SELECT count(*) FROM index_entries").fetchone()[0]
        assert stored == entries, f"the registry holds {stored} entries, not {entries}"
        print(
            f"  publish rep {rep + 1}: {figure.values[-1]:,.0f}/s vs {figure.baselines[-1]:,.0f}/s"
        )
        await asyncio.to_thread(_remove, root, "publish-*")
    figure.notes = "requests built before timing, sent one at a time as a node does"
    return figure
