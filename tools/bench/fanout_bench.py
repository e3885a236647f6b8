"""Fan-out search through the gateway, beside the same number of concurrent echo calls.

In-process: the registry, the asking node (node-1, holding nothing) and the
answering nodes all run in this process, and so do the baseline's echo
servers (one per answering node, each its own mutual-TLS channel).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable
from pathlib import Path

from tools.bench.common import ECHO_METHOD, Figure, echo_server, mint_node, p99
from tools.bench.network import bench_network
from tools.gateway_client import FacilityResult, GatewayClient
from tools.spread import spread
from tools.synthetic import generate
from transmural import pki, transport
from transmural.identifiers import BSN_SYSTEM

ANSWERING = 5


async def _search(client: GatewayClient, bsn: str, expected: int) -> None:
    answered = [e async for e in client.search(bsn) if isinstance(e, FacilityResult)]
    assert len(answered) == expected and all(r.status == "ok" for r in answered), answered


async def fanout(root: Path, reps: int, searches: int) -> list[Figure]:
    """p50/p99 of a search answered by 1 and by ``ANSWERING`` nodes."""
    async with bench_network(root / "fanout", 1 + ANSWERING) as net:
        network = net.registry.network
        assert network is not None
        bundles = root / "fanout" / "bundles"
        generate(bundles)
        only_one, everyone = root / "fanout" / "share-0", root / "fanout" / "share-1"
        plan = spread(bundles, [only_one, everyone])
        # node-2 holds both shares, nodes 3.. only the second: a patient of the
        # first share alone is answered by one node, of the second alone by all.
        await net.load(net.nodes[1], only_one, everyone)
        for node in net.nodes[2:]:
            await net.load(node, everyone)

        def patient(share: int) -> str:
            fhir_id = next(f for f in sorted(plan.patients) if plan.patients[f].nodes == [share])
            return next(v for s, v in plan.patients[fhir_id].identifiers if s == BSN_SYSTEM)

        client = await net.client(0)
        tls = mint_node(network, "bench-client")
        servers = [echo_server(network.tls) for _ in range(ANSWERING)]
        for server, _ in servers:
            await server.start()
        channels = [transport.open_channel(a, tls, pki.REGISTRY_DNS_NAME) for _, a in servers]
        echoes = [c.unary_unary(ECHO_METHOD) for c in channels]
        figures = []
        try:
            for answering, bsn in ((1, patient(0)), (ANSWERING, patient(1))):
                p50 = Figure(f"Fan-out search p50, {answering} answering node(s)", "ms",
                             f"{answering} concurrent plain echo calls over mutual TLS",
                             2.0 if answering == ANSWERING else None,
                             higher_is_better=False)  # fmt: skip
                tail = Figure(f"Fan-out search p99, {answering} answering node(s)", "ms",
                              "p99 of the same echo fan-outs", None,
                              higher_is_better=False)  # fmt: skip
                await _search(client, bsn, answering)  # warm up channels
                await asyncio.gather(*(e(b"x" * 64) for e in echoes[:answering]))
                for _ in range(reps):
                    searched = [
                        await _timed(_search(client, bsn, answering)) for _ in range(searches)
                    ]
                    fanned = [
                        await _timed(asyncio.gather(*(e(b"x" * 64) for e in echoes[:answering])))
                        for _ in range(searches)
                    ]
                    p50.values.append(statistics.median(searched))
                    p50.baselines.append(statistics.median(fanned))
                    tail.values.append(p99(searched))
                    tail.baselines.append(p99(fanned))
                p50.notes = (
                    "in-process (registry, asking node, answering nodes and echo servers share "
                    "this process); a search also asks the registry and signs an assertion; "
                    "the issue's "
                    "target (p50 <= 2x) is for 20 nodes, applied here at the most nodes measured"
                )
                figures += [p50, tail]
        finally:
            for channel in channels:
                await channel.close()
            for server, _ in servers:
                await server.stop(0)
        return figures


async def _timed(work: Awaitable[object]) -> float:
    started = time.perf_counter()
    await work
    return (time.perf_counter() - started) * 1000
