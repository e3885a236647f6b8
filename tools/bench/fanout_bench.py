"""Fan-out search through the gateway, beside the same number of concurrent echo calls.

Every server is its own process: the registry, the asking node (node-1,
holding nothing) and the answering nodes, and for the baseline one echo
server process per answering node, each reached over its own mutual-TLS
channel. Three synthetic patient sets are spread so that one patient is
held by 1 node, one by 5 and one by all answering nodes.

A search does more than the echo: the gateway checks the clinician's
token, pseudonymises, asks the registry, writes its audit record, signs
an assertion per holder; each holder verifies it, decides consent, writes
its audit record and lists documents; the gateway audits every answer.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from registry.network import load_network
from tools.bench.common import ECHO_METHOD, Figure, mint_node, p99
from tools.bench.processes import echo_processes, node_processes
from tools.gateway_client import FacilityResult, GatewayClient
from tools.synthetic import generate
from transmural import pki, transport
from transmural.identifiers import BSN_SYSTEM, canonical

#: Answering nodes per figure; the issue's target applies at the most.
FULL = (1, 5, 20)
QUICK = (1, 3)


async def _search(client: GatewayClient, bsn: str, expected: int) -> None:
    answered = [e async for e in client.search(bsn) if isinstance(e, FacilityResult)]
    assert len(answered) == expected and all(r.status == "ok" for r in answered), answered


def _patient_sets(root: Path, counts: tuple[int, ...]) -> list[tuple[int, Path]]:
    """One synthetic set per count (distinct seeds: distinct patients)."""
    sets = []
    for count in counts:
        generate(root / f"set-{count}", 2, seed=100 + count)
        sets.append((count, root / f"set-{count}"))
    return sets


def _first_bsn(folder: Path) -> str:
    for bundle in sorted(folder.glob("*.json")):
        for entry in json.loads(bundle.read_text()).get("entry", []):
            resource = entry.get("resource", {})
            if resource.get("resourceType") == "Patient":
                for identifier in resource.get("identifier", []):
                    if identifier.get("system") == BSN_SYSTEM:
                        return str(canonical(BSN_SYSTEM, identifier["value"]).value)
    raise AssertionError(f"no patient with a BSN in {folder}")


async def fanout(root: Path, reps: int, searches: int, quick: bool = False) -> list[Figure]:
    """p50/p99 of searches answered by each count of nodes, beside echo fan-outs."""
    counts = QUICK if quick else FULL
    sets = _patient_sets(root / "fanout-data", counts)
    answering = max(counts)
    # node-1 asks and holds nothing; node k+1 holds every set held by >= k nodes.
    holdings: list[list[Path]] = [[]] + [
        [f for n, f in sets if n >= k] for k in range(1, answering + 1)
    ]
    figures = []
    async with node_processes(root / "fanout", holdings) as net:
        client = GatewayClient(net.access(0))
        network = load_network(net.network_dir)
        tls = mint_node(network, "bench-client")
        async with echo_processes(answering, network.tls) as addresses:
            channels = [transport.open_channel(a, tls, pki.REGISTRY_DNS_NAME) for a in addresses]
            echoes = [c.unary_unary(ECHO_METHOD) for c in channels]
            try:
                for count, folder in sets:
                    figures += await _measure(client, echoes[:count], _first_bsn(folder), count,
                                              answering, reps, searches)  # fmt: skip
            finally:
                await client.close()
                for channel in channels:
                    await channel.close()
    return figures


async def _measure(
    client: GatewayClient,
    echoes: list[Callable[[bytes], Awaitable[object]]],
    bsn: str,
    count: int,
    most: int,
    reps: int,
    searches: int,
) -> list[Figure]:
    p50 = Figure(f"Fan-out search p50, {count} answering node(s)", "ms",
                 f"{count} concurrent plain echo calls, one per echo process, mutual TLS",
                 2.0 if count == most else None, higher_is_better=False)  # fmt: skip
    tail = Figure(f"Fan-out search p99, {count} answering node(s)", "ms",
                  "p99 of the same echo fan-outs", None, higher_is_better=False)  # fmt: skip
    for _ in range(3):  # warm up channels on both sides
        await _search(client, bsn, count)
        await asyncio.gather(*(e(b"x" * 64) for e in echoes))
    for _ in range(reps):
        searched = [await _timed(_search(client, bsn, count)) for _ in range(searches)]
        fanned = [
            await _timed(asyncio.gather(*(e(b"x" * 64) for e in echoes))) for _ in range(searches)
        ]
        p50.values.append(statistics.median(searched))
        p50.baselines.append(statistics.median(fanned))
        tail.values.append(p99(searched))
        tail.baselines.append(p99(fanned))
    p50.notes = (
        f"each node and each echo server its own process ({1 + most} node processes, "
        f"{most} echo processes, 2 cores); the issue's target (p50 <= 2x) is for 20 nodes, "
        "applied at the most nodes measured"
    )
    return [p50, tail]


async def _timed(work: Awaitable[object]) -> float:
    started = time.perf_counter()
    await work
    return (time.perf_counter() - started) * 1000
