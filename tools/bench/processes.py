"""Servers as separate processes, as a real network runs them: nodes and echo servers.

``node_processes`` sets up a network the way devnet does (network init,
invite, join, ingest by ``transmural-admin``, servers by ``python -m
node.cli serve``), except that the bench decides which bundles each node
holds and every patient consents to all sharing. ``echo_processes``
starts the baseline's plain gRPC servers, one process each, on the same
kind of mutual-TLS channel.

Memory is read from ``/proc/<pid>/status``: VmHWM is the peak resident
size, and writing ``5`` to ``/proc/<pid>/clear_refs`` resets it, so the
peak of one operation can be read on a long-running server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from multiprocessing.connection import Connection
from pathlib import Path

from node.consent_desk import ConsentDesk
from node.store import NodeStore
from registry.network import init_network
from tools import devnet
from tools.bench.common import echo_server, relay_server
from tools.spread import spread
from tools.supervise import ProcessError
from transmural import transport
from transmural.identifiers import BSN_SYSTEM


def _quiet(_: str) -> None:
    """devnet's progress lines are not the bench's."""


@asynccontextmanager
async def node_processes(
    root: Path,
    holdings: list[list[Path]],
    before_start: Callable[[list[Path]], Awaitable[None]] | None = None,
) -> AsyncIterator[devnet.DevNet]:
    """A registry and ``len(holdings)`` node processes; node i ingests ``holdings[i]``.

    Every patient a node holds consents to all sharing; ``before_start``
    gets the node databases after ingest, before any node serves; the
    block starts once every node's index is published.
    """
    await asyncio.to_thread(init_network, root / "network", "Bench network")
    sources = sorted({folder for folders in holdings for folder in folders})
    plan = spread(sources[0], [root / f"node-{i + 1}" / "plan" for i in range(len(holdings))])
    net = devnet.DevNet(root, plan, BSN_SYSTEM, insecure=False)
    try:
        devnet.start_registry(net)
        await devnet.enrol(net, _quiet)
        await devnet.add_clinicians(net)
        for index, folders in enumerate(holdings):
            _collect(net.node_dir(index) / "bundles", folders)
        holding = [c for c, folders in zip(net.configs, holdings, strict=True) if folders]
        only_holding = dataclasses.replace(net, configs=holding)
        await asyncio.to_thread(devnet.ingest_all, only_holding, _quiet)
        await _consent_all(net)
        if before_start is not None:
            await before_start([c.database for c in net.configs])
        await asyncio.to_thread(devnet.start_nodes, net)
        await devnet.wait_published(net)
        yield net
    finally:
        net.stop()


def _collect(target: Path, folders: list[Path]) -> None:
    """Copy the bundles of ``folders`` into ``target`` (names prefixed: sets may clash)."""
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for number, folder in enumerate(folders):
        for bundle in sorted(folder.glob("*.json")):
            shutil.copyfile(bundle, target / f"{number}-{bundle.name}")


async def _consent_all(net: devnet.DevNet) -> None:
    for config in net.configs:
        store = await NodeStore.open(config.database)
        try:
            desk = ConsentDesk(store)
            await desk.record(
                [desk.blanket(p.patient_key, True, "bench") for p in await store.patients()]
            )
        finally:
            await store.close()


# --- memory of a running process ---


def resident_bytes(pid: int, field: str = "VmRSS") -> int:
    """VmRSS (now) or VmHWM (peak) of process ``pid``, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise ProcessError(f"/proc/{pid}/status has no {field}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time process ``pid`` has used so far (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reset_peak(pid: int) -> bool:
    """Reset the peak resident size of ``pid`` to its current size; False where not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


# --- the baseline's echo servers, one process each ---


def _serve_echo(tls: transport.TlsFiles, conn: Connection) -> None:
    async def main() -> None:
        server, address = echo_server(tls)
        await server.start()
        conn.send(address)
        await asyncio.to_thread(conn.recv)
        await server.stop(0)

    asyncio.run(main())


def _serve_relay(
    tls: transport.TlsFiles, client_tls: transport.TlsFiles, upstreams: list[str], conn: Connection
) -> None:
    async def main() -> None:
        server, address, channels = relay_server(tls, client_tls, upstreams)
        await server.start()
        conn.send(address)
        await asyncio.to_thread(conn.recv)
        await server.stop(0)
        for channel in channels:
            await channel.close()

    asyncio.run(main())


@asynccontextmanager
async def relay_process(
    tls: transport.TlsFiles, client_tls: transport.TlsFiles, upstreams: list[str]
) -> AsyncIterator[str]:
    """A plain relay (``relay_server``) to ``upstreams`` in its own process: its address."""
    async with _served(_serve_relay, [(tls, client_tls, upstreams)]) as (address,):
        yield address


@asynccontextmanager
async def echo_processes(count: int, tls: transport.TlsFiles) -> AsyncIterator[list[str]]:
    """``count`` plain echo servers (unary and streaming), each its own process."""
    async with _served(_serve_echo, [(tls,)] * count) as addresses:
        yield addresses


@asynccontextmanager
async def _served(
    serve: Callable[..., None], arguments: list[tuple[object, ...]]
) -> AsyncIterator[list[str]]:
    """One process per argument tuple running ``serve(*arguments, conn)``: their addresses."""
    context = multiprocessing.get_context("spawn")
    started = []
    try:
        for args in arguments:
            ours, theirs = context.Pipe()
            process = context.Process(target=serve, args=(*args, theirs))
            process.start()
            started.append((process, ours))
        addresses = []
        for _, ours in started:
            if not await asyncio.to_thread(ours.poll, 60):
                raise ProcessError(f"a {serve.__name__} process did not start within 60 s")
            addresses.append(ours.recv())
        yield addresses
    finally:
        for _, ours in started:
            with suppress(OSError):
                ours.send("stop")
        for process, _ in started:
            await asyncio.to_thread(process.join, 10)
            if process.is_alive():
                process.terminate()
