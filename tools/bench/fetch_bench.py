"""Document fetch through gateway and peer, beside plain gRPC streaming of the same bytes.

The network (registry and two joined nodes) runs in this process, as the
tests' ``network`` fixture does; so does the plain streaming server of the
baseline, so both share the same core budget.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import BinaryIO

from node.server import NodeServer
from tools.bench.common import ECHO_STREAM_METHOD, Figure, echo_server, mint_node
from tools.bench.network import bench_network
from tools.spread import spread
from tools.synthetic import generate
from transmural import pki, transport
from transmural.const import DOCUMENT_CHUNK_BYTES
from transmural.identifiers import BSN_SYSTEM, canonical

SIZES = (1_000_000, 100_000_000)


class Sink:
    """Counts what is written; keeps nothing (memory bounded by the chunk)."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data: bytes) -> int:
        self.size += len(data)
        return len(data)


async def _replace_content(node: NodeServer, document_id: str, size: int) -> None:
    """Give the document ``size`` bytes of content, written straight into the store."""
    chunk = bytes(range(256)) * (DOCUMENT_CHUNK_BYTES // 256)
    digest = hashlib.sha256()
    rows = []
    for seq, start in enumerate(range(0, size, DOCUMENT_CHUNK_BYTES)):
        data = chunk[: min(DOCUMENT_CHUNK_BYTES, size - start)]
        digest.update(data)
        rows.append((document_id, seq, data))
    async with node.store._db.transaction("bench_document") as db:
        await db.execute("DELETE FROM document_chunks WHERE document_id = ?", (document_id,))
        await db.executemany(
            "INSERT INTO document_chunks (document_id, seq, data) VALUES (?, ?, ?)", rows
        )
        await db.execute(
            "UPDATE documents SET size = ?, sha256 = ? WHERE document_id = ?",
            (size, digest.hexdigest(), document_id),
        )


async def fetch(root: Path, reps: int, sizes: tuple[int, ...] = SIZES) -> list[Figure]:
    async with bench_network(root / "fetch", 2) as net:
        assert net.registry.network is not None
        bundles = root / "fetch" / "bundles"
        generate(bundles)
        shares = [root / "fetch" / f"share-{i}" for i in range(2)]
        plan = spread(bundles, shares)
        for node, share in zip(net.nodes, shares, strict=True):
            await net.load(node, share)
        fhir_id = next(f for f in sorted(plan.patients) if 1 in plan.patients[f].nodes)
        bsn = next(v for s, v in plan.patients[fhir_id].identifiers if s == BSN_SYSTEM)
        patient = await net.nodes[1].store.patient_by_identifier(canonical(BSN_SYSTEM, bsn))
        assert patient is not None
        document_id = (await net.nodes[1].store.documents_of(patient.patient_key))[0].document_id
        client = await net.client(0)
        plain_server, plain_address = echo_server(net.registry.network.tls)
        await plain_server.start()
        tls = mint_node(net.registry.network, "bench-client")
        plain = transport.open_channel(plain_address, tls, pki.REGISTRY_DNS_NAME)
        try:
            stream = plain.unary_stream(ECHO_STREAM_METHOD)
            figures = []
            for size in sizes:
                await _replace_content(net.nodes[1], document_id, size)
                figure = Figure(
                    f"Document fetch, {size / 1e6:g} MB, gateway -> peer", "MB/s",
                    f"plain gRPC server streaming, same bytes in "
                    f"{DOCUMENT_CHUNK_BYTES // 1024} KiB chunks", 0.7,
                )  # fmt: skip
                for _ in range(reps):
                    sink = Sink()
                    started = time.perf_counter()
                    await client.fetch(bsn, "node-2", document_id, _io(sink))
                    figure.values.append(size / 1e6 / (time.perf_counter() - started))
                    assert sink.size == size
                    received = 0
                    started = time.perf_counter()
                    request = size.to_bytes(8, "big") + DOCUMENT_CHUNK_BYTES.to_bytes(4, "big")
                    async for chunk in stream(request):
                        received += len(chunk)
                    figure.baselines.append(size / 1e6 / (time.perf_counter() - started))
                    assert received == size
                figure.notes = (
                    "registry, both nodes and the plain server run in this one process; the "
                    "fetch crosses two hops (clinician -> gateway -> peer, each mutual TLS or "
                    "TLS) and reads SQLite chunks, the baseline one hop from memory"
                )
                figures.append(figure)
            return figures
        finally:
            await plain.close()
            await plain_server.stop(0)


def _io(sink: Sink) -> BinaryIO:
    return sink  # type: ignore[return-value]
