"""Document fetch through gateway and peer, beside plain gRPC streaming of the same bytes.

The registry and two nodes run as separate processes, as in a real
network; the baseline's plain streaming server is a process too. The
document's content is replaced by ``size`` bytes before node-2 starts
(written straight into its store, in the store's own chunking).

Between the two, a plain relay process passes the plain server's stream
on, bytes as they are: the fetch's two-hop shape (clinician -> own node
-> holder) with none of its work, so its ratio to the one-hop baseline is
what the second hop alone costs on this machine.

Memory: the peak resident size of both node processes is reset before
each fetch and read after it (``/proc/<pid>/clear_refs``, VmHWM); the
growth is what one fetch of that size cost, to compare with the chunk
size rather than the document size.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import BinaryIO

from node.store import NodeStore
from registry.network import load_network
from tools.bench.common import ECHO_STREAM_METHOD, RELAY_STREAM_METHOD, Figure, mint_node
from tools.bench.processes import (
    cpu_seconds,
    echo_processes,
    node_processes,
    relay_process,
    reset_peak,
    resident_bytes,
)
from tools.gateway_client import GatewayClient
from tools.synthetic import generate
from transmural import pki, transport
from transmural.const import DOCUMENT_CHUNK_BYTES, FETCH_PIECE_BYTES
from transmural.identifiers import BSN_SYSTEM

SIZES = (1_000_000, 100_000_000)
MIB = 1024 * 1024


class Sink:
    """Counts what is written; keeps nothing (memory bounded by the chunk)."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data: bytes) -> int:
        self.size += len(data)
        return len(data)


async def _largest_document(database: Path, size: int) -> tuple[str, str]:
    """(BSN, document id) of a document of node's store, its content replaced by ``size`` bytes."""
    store = await NodeStore.open(database)
    try:
        for patient in await store.patients():
            documents = await store.documents_of(patient.patient_key)
            bsn = patient.identifier
            if documents and bsn is not None and bsn.system == BSN_SYSTEM:
                await _replace_content(store, documents[0].document_id, size)
                return bsn.value, documents[0].document_id
    finally:
        await store.close()
    raise AssertionError(f"no document of a patient with a BSN in {database}")


async def _replace_content(store: NodeStore, document_id: str, size: int) -> None:
    chunk = bytes(range(256)) * (DOCUMENT_CHUNK_BYTES // 256)
    digest = hashlib.sha256()
    async with store._db.transaction("bench_document") as db:
        await db.execute("DELETE FROM document_chunks WHERE document_id = ?", (document_id,))
        for seq, start in enumerate(range(0, size, DOCUMENT_CHUNK_BYTES)):
            data = chunk[: min(DOCUMENT_CHUNK_BYTES, size - start)]
            digest.update(data)
            await db.execute(
                "INSERT INTO document_chunks (document_id, seq, data) VALUES (?, ?, ?)",
                (document_id, seq, data),
            )
        await db.execute(
            "UPDATE documents SET size = ?, sha256 = ? WHERE document_id = ?",
            (size, digest.hexdigest(), document_id),
        )


async def fetch(root: Path, reps: int, sizes: tuple[int, ...] = SIZES) -> list[Figure]:
    figures = []
    for size in sizes:
        figures += await _fetch_size(root / f"fetch-{size}", reps, size)
    return figures


async def _fetch_size(root: Path, reps: int, size: int) -> list[Figure]:
    generate(root / "bundles", 2)
    holdings: list[list[Path]] = [[], [root / "bundles"]]
    found: list[tuple[str, str]] = []

    async def give_content(databases: list[Path]) -> None:
        found.append(await _largest_document(databases[1], size))

    async with node_processes(root / "net", holdings, before_start=give_content) as net:
        bsn, document_id = found[0]
        client = GatewayClient(net.access(0))
        network = load_network(net.network_dir)
        tls = mint_node(network, "bench-client")
        pids = [server.process.pid for server in net.nodes]
        async with (
            echo_processes(1, network.tls) as (address,),
            relay_process(network.tls, mint_node(network, "bench-relay"), [address]) as relay,
        ):
            plain = transport.open_channel(address, tls, pki.REGISTRY_DNS_NAME)
            stream = plain.unary_stream(ECHO_STREAM_METHOD)
            relayed = transport.open_channel(relay, tls, pki.REGISTRY_DNS_NAME)
            relayed_stream = relayed.unary_stream(RELAY_STREAM_METHOD)
            figure = Figure(
                f"Document fetch, {size / 1e6:g} MB, gateway -> peer", "MB/s",
                f"plain gRPC server streaming of the same bytes in the same "
                f"{FETCH_PIECE_BYTES // 1024} KiB messages, one process to the client", 0.7,
            )  # fmt: skip
            shape = Figure(
                f"Plain relay fetch, {size / 1e6:g} MB, one relay process", "MB/s",
                "the same plain stream straight from its process (the fetch's baseline)", None,
            )  # fmt: skip
            work = Figure(
                f"Document fetch, {size / 1e6:g} MB, against the plain relay", "MB/s",
                "the plain relay of the same bytes", None,
            )  # fmt: skip
            growth = [0, 0]
            cpu = [0.0, 0.0, 0.0]  # asking node, holding node, client: seconds over all reps
            try:
                for _ in range(reps):
                    peaks = [(resident_bytes(p), reset_peak(p)) for p in pids]
                    started = [*map(cpu_seconds, pids), time.process_time()]
                    figure.values.append(await _timed_fetch(client, bsn, document_id, size))
                    ended = [*map(cpu_seconds, pids), time.process_time()]
                    cpu = [c + e - s for c, s, e in zip(cpu, started, ended, strict=True)]
                    for side, (pid, (before, reset)) in enumerate(zip(pids, peaks, strict=True)):
                        if reset:
                            peak = resident_bytes(pid, "VmHWM") - before
                            growth[side] = max(growth[side], peak)
                    figure.baselines.append(await _timed_stream(stream, size))
                    shape.values.append(await _timed_stream(relayed_stream, size))
            finally:
                await client.close()
                await plain.close()
                await relayed.close()
    shape.baselines = figure.baselines
    work.values, work.baselines = figure.values, shape.values
    shape.notes = (
        "the relay passes the bytes on (no parsing, database, audit or checks): what the "
        "fetch's two hops cost on this machine with none of its work"
    )
    figure.notes = (
        "registry, nodes and the plain server are separate processes; the fetch crosses two "
        "hops (clinician -> gateway over TLS, gateway -> peer over mutual TLS) and reads "
        "SQLite chunks, the baseline one hop from memory; peak resident growth during a "
        f"fetch: asking node {growth[0] / MIB:.1f} MiB, holding node {growth[1] / MIB:.1f} MiB; "
        "CPU per 100 MB fetched: asking node {:.2f} s, holding node {:.2f} s, client {:.2f} s "
        "(the asking node relays: it does the baseline client's and server's work both)".format(
            *(seconds / (size * reps / 100e6) for seconds in cpu)
        )
    )
    return [figure, shape, work]


async def _timed_fetch(client: GatewayClient, bsn: str, document_id: str, size: int) -> float:
    sink = Sink()
    started = time.perf_counter()
    await client.fetch(bsn, "node-2", document_id, _io(sink))
    elapsed = time.perf_counter() - started
    assert sink.size == size, (sink.size, size)
    return size / 1e6 / elapsed


async def _timed_stream(stream, size: int) -> float:  # type: ignore[no-untyped-def]
    received = 0
    started = time.perf_counter()
    request = size.to_bytes(8, "big") + FETCH_PIECE_BYTES.to_bytes(4, "big")
    async for chunk in stream(request):
        received += len(chunk)
    elapsed = time.perf_counter() - started
    assert received == size
    return size / 1e6 / elapsed


def _io(sink: Sink) -> BinaryIO:
    return sink  # type: ignore[return-value]
