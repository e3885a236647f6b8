"""What every benchmark shares: figures, a test PKI, an echo server, a server process."""

from __future__ import annotations

import asyncio
import multiprocessing
import resource
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

import grpc

from registry.network import NetworkFiles, init_network, load_network
from registry.server import RegistryServer
from transmural import pki, transport

ECHO_METHOD = "/bench.Echo/Echo"
ECHO_STREAM_METHOD = "/bench.Echo/Stream"
RELAY_FAN_METHOD = "/bench.Relay/Fan"
RELAY_STREAM_METHOD = "/bench.Relay/Stream"


@dataclass
class Figure:
    """One measured figure and its baseline, each repeated; the ratio is the headline.

    What it must reach is ``target``, a ratio to the baseline, or ``limit``,
    a bound on the figure itself (median, in ``unit``) where a ratio says
    nothing: "no failed search" is 0 failures, not 0x of anything.
    """

    name: str
    unit: str
    baseline_name: str
    target: float | None  # ratio to reach (or stay under, when lower is better); None: reported
    higher_is_better: bool = True
    values: list[float] = field(default_factory=list)
    baselines: list[float] = field(default_factory=list)
    notes: str = ""
    limit: float | None = None  # the value itself to reach (or stay under); None: no bound

    @property
    def value(self) -> float:
        return statistics.median(self.values)

    @property
    def ratio(self) -> float:
        return self.value / statistics.median(self.baselines)

    @property
    def checked(self) -> bool:
        """Whether the figure has anything to meet (else it is only reported)."""
        return self.target is not None or self.limit is not None

    @property
    def met(self) -> bool:
        return self._within(self.ratio, self.target) and self._within(self.value, self.limit)

    @property
    def goal(self) -> str:
        """What must be met, as the report prints it: ``>= 2x``, ``<= 0 searches``, ``-``."""
        sign = ">=" if self.higher_is_better else "<="
        if self.limit is not None:
            return f"{sign} {self.limit:g} {self.unit}"
        return "-" if self.target is None else f"{sign} {self.target:g}x"

    @property
    def achieved(self) -> str:
        """What was measured against the goal: the value for a limit, else the ratio."""
        return f"{self.value:g} {self.unit}" if self.limit is not None else f"{self.ratio:.2f}x"

    def _within(self, got: float, bound: float | None) -> bool:
        if bound is None:
            return True
        return got >= bound if self.higher_is_better else got <= bound


def spread(values: list[float]) -> str:
    """min / median / max, three significant-ish figures."""
    return " / ".join(f"{v:,.3g}" if v < 100 else f"{v:,.0f}" for v in
                      (min(values), statistics.median(values), max(values)))  # fmt: skip


def p99(latencies: list[float]) -> float:
    """The 99th percentile by nearest rank: the ceil(0.99 n)-th smallest sample.

    At least 99 % of the samples are at or below it. With 100 samples that
    is the 99th smallest, not the maximum (indexing at int(0.99 n) was).
    Integer arithmetic, so 0.99 * n's rounding cannot push the rank up one.
    """
    ordered = sorted(latencies)
    rank = (99 * len(ordered) + 99) // 100  # ceil(99 n / 100), 1-based
    return ordered[rank - 1]


async def closed_loop(
    call: Callable[[], Awaitable[object]], in_flight: int, seconds: float
) -> tuple[int, float, list[float]]:
    """``in_flight`` workers calling ``call`` back to back: (calls, elapsed s, latencies s)."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return len(latencies), time.perf_counter() - started, latencies


# --- PKI ---


def make_network(folder: Path) -> NetworkFiles:
    return init_network(folder, "Bench network")


def mint_node(network: NetworkFiles, node_id: str) -> transport.TlsFiles:
    """A node certificate signed by the network CA directly (as tests/registry_pki.py does)."""
    key = pki.new_private_key()
    cert = pki.issue_node_certificate(
        network.ca_key, network.ca_cert, pki.make_csr(key, node_id), node_id,
        f"URA-{node_id}", f"Facility {node_id}",
    )  # fmt: skip
    return transport.TlsFiles(pki.pem(network.ca_cert), pki.pem(cert), pki.key_pem(key))


# --- echo: the plain gRPC baseline ---


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def _stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    """Streams ``total`` bytes (8-byte big-endian total, then 4-byte chunk size) in chunks."""
    total, chunk = int.from_bytes(request[:8], "big"), int.from_bytes(request[8:12], "big")
    payload = bytes(chunk)
    for start in range(0, total, chunk):
        yield payload[: min(chunk, total - start)]


def echo_server(tls: transport.TlsFiles) -> tuple[grpc.aio.Server, str]:
    """A plain unary echo and byte-streaming server on mutual TLS; not yet started."""
    server = transport.new_server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("bench.Echo", {
        "Echo": grpc.unary_unary_rpc_method_handler(_echo),
        "Stream": grpc.unary_stream_rpc_method_handler(_stream),
    })])  # fmt: skip
    return server, transport.bind(server, "127.0.0.1:0", tls, client_certificates=True)


# --- a plain relay: the gateway's shape with none of its work ---


def relay_server(
    tls: transport.TlsFiles, client_tls: transport.TlsFiles, upstreams: list[str]
) -> tuple[grpc.aio.Server, str, list[grpc.aio.Channel]]:
    """A server that passes calls on to echo servers, as a gateway does to peers; not started.

    ``Fan`` calls the first n upstreams' echo at once (n: the request's
    first two bytes, big-endian) and streams each answer back as it comes
    (a search's shape); ``Stream`` relays the first
    upstream's byte stream (a fetch's shape). Bytes pass through as they
    are: no parsing, no database, no checks. What this costs against
    calling the echo servers directly is what two hops cost on this
    machine, whatever the relay does besides. Returns the server, its
    address and the channels to close after it.
    """
    channels = [transport.open_channel(a, client_tls, pki.REGISTRY_DNS_NAME) for a in upstreams]
    echoes = [c.unary_unary(ECHO_METHOD) for c in channels]
    stream = channels[0].unary_stream(ECHO_STREAM_METHOD)

    async def fan(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        count = int.from_bytes(request[:2], "big")
        for answer in asyncio.as_completed([echo(request) for echo in echoes[:count]]):
            yield await answer

    async def relay(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async for chunk in stream(request):
            yield chunk

    server = transport.new_server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("bench.Relay", {
        "Fan": grpc.unary_stream_rpc_method_handler(fan),
        "Stream": grpc.unary_stream_rpc_method_handler(relay),
    })])  # fmt: skip
    address = transport.bind(server, "127.0.0.1:0", tls, client_certificates=True)
    return server, address, channels


# --- a registry (and echo server) in a child process ---


def _serve_registry(db: Path, network_dir: Path, conn: Connection) -> None:
    async def main() -> None:
        network = load_network(network_dir)
        registry = RegistryServer(db, network_dir=network_dir)
        await registry.start()
        echo, echo_address = echo_server(network.tls)
        await echo.start()
        conn.send((registry.address, echo_address))
        await asyncio.to_thread(conn.recv)
        await echo.stop(0)
        await registry.stop(0)

    asyncio.run(main())
    conn.send(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


@dataclass
class ServedRegistry:
    address: str
    echo_address: str
    peak_rss: int = 0  # bytes, known after the block ends


@asynccontextmanager
async def registry_process(db: Path, network_dir: Path) -> AsyncIterator[ServedRegistry]:
    """The real RegistryServer (and an echo server) in a child process on its own core."""
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(target=_serve_registry, args=(db, network_dir, theirs))
    process.start()
    try:
        if not await asyncio.to_thread(ours.poll, 60):
            raise RuntimeError("the registry process did not start within 60 s")
        address, echo_address = ours.recv()
        served = ServedRegistry(address, echo_address)
        yield served
        ours.send("stop")
        served.peak_rss = await asyncio.to_thread(ours.recv)
    finally:
        await asyncio.to_thread(process.join, 10)
        if process.is_alive():
            process.terminate()
