"""Fixtures that start real networks: a registry and N nodes on loopback.

    async def test_something(network):
        net = await network(n=3)
        await net.load(synthetic_bundles)      # spread over the nodes by provider
        async for event in net.client(0).search("...")

Servers run in this process on ephemeral ports and talk real gRPC.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from node.answers import Facility
from node.config import NodeConfig
from node.consent_desk import ConsentDesk
from node.ingest import ingest_folder
from node.records import IndexChange
from node.registry_link import RegistryLink
from node.server import NodeServer
from node.users import Clinicians
from registry.network import init_network
from registry.server import RegistryServer
from tools.gateway_client import FacilityResult, GatewayClient, Holders, NodeAccess
from tools.join import join
from tools.spread import SpreadPlan, spread
from tools.synthetic import generate
from transmural import pki, transport
from transmural.identifiers import BSN_SYSTEM, canonical
from transmural.pseudonym import Pseudonymiser, new_network_key, write_network_key

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

CLINICIAN_ID = "test-physician"


def shared_data(name: str) -> Path:
    """A folder of ../shared/data; fails (never skips) when it is missing."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.fail(f"test data {path} is missing: the project expects ../shared/data")
    return path


@dataclass
class RunningNetwork:
    root: Path
    registry: RegistryServer
    nodes: list[NodeServer]
    key: bytes
    tokens: list[str] = field(default_factory=list)
    ca_pem: bytes | None = None
    clients: list[GatewayClient] = field(default_factory=list)
    plan: SpreadPlan | None = None

    @property
    def pseudonymiser(self) -> Pseudonymiser:
        return Pseudonymiser(self.key)

    def access(self, index: int = 0, token: str | None = None) -> NodeAccess:
        """How node ``index``'s clinician reaches its gateway."""
        node = self.nodes[index]
        return NodeAccess(
            node.gateway_address,
            self.tokens[index] if token is None else token,
            self.ca_pem,
            node.config.node_id,
        )

    def client(self, index: int = 0, token: str | None = None) -> GatewayClient:
        client = GatewayClient(self.access(index, token))
        self.clients.append(client)
        return client

    async def load(self, source: Path) -> SpreadPlan:
        """Spread ``source`` bundles over the nodes, ingest, publish."""
        targets = [self.root / n.config.node_id / "bundles" for n in self.nodes]
        self.plan = await asyncio.to_thread(spread, source, targets)
        for node, target in zip(self.nodes, targets, strict=True):
            _, errors = await ingest_folder(
                node.store, target, self.pseudonymiser, node.config.national_system
            )
            assert not errors, errors
        await self.published()
        return self.plan

    async def published(self) -> None:
        """Push every node's pending index changes to the registry now."""
        for node in self.nodes:
            await node.publisher.publish_pending()

    async def consent_all(self, allowed: bool = True) -> None:
        """Every patient at every node consents to all (or refuses all) sharing."""
        for node in self.nodes:
            desk = ConsentDesk(node.store)
            records = [
                desk.blanket(p.patient_key, allowed, "test desk")
                for p in await node.store.patients()
            ]
            await desk.record(records)
        await self.published()

    async def deny_organisation(self, node_index: int, bsn: str, organisation_id: str) -> None:
        """At node ``node_index``, the patient refuses one organisation (all data)."""
        node = self.nodes[node_index]
        patient = await node.store.patient_by_identifier(canonical(BSN_SYSTEM, bsn))
        assert patient is not None, f"node-{node_index + 1} does not hold that patient"
        desk = ConsentDesk(node.store)
        deny = dataclasses.replace(
            desk.blanket(patient.patient_key, False, "test desk"),
            actor_kind="organisation",
            actor=organisation_id,
        )
        await desk.record([deny])
        await self.published()

    async def stop(self) -> None:
        for client in self.clients:
            await client.close()
        for node in self.nodes:
            await node.stop(0)
        await self.registry.stop(0)


NetworkFactory = Callable[..., Awaitable[RunningNetwork]]


async def join_node(
    registry: RegistryServer, folder: Path, index: int, **settings: Any
) -> NodeConfig:
    """Invite and join facility ``index`` (flow 2), returning its node config."""
    assert registry.membership is not None and registry.join_address
    node_id = f"node-{index + 1}"
    token = await registry.membership.create_invite(
        f"URA-{90000000 + index + 1}", f"Facility {index + 1}", node_id, registry.join_address
    )
    joined = await join(token, folder)
    return NodeConfig(
        node_id=joined.node_id,
        organisation_name=joined.organisation_name,
        organisation_id=joined.organisation_id,
        registry=joined.registry_endpoint,
        database=folder / "node.db",
        network_key_file=joined.paths.network_key,
        certificate=joined.paths.node_cert,
        private_key=joined.paths.node_key,
        ca_certificate=joined.paths.ca_cert,
        **settings,
    )


@pytest.fixture
async def network(tmp_path: Path) -> AsyncIterator[NetworkFactory]:
    """Start a registry and ``n`` joined nodes on loopback, all on mutual TLS.

    ``insecure=True`` runs everything as --insecure-dev instead (plain gRPC).
    """
    started: list[RunningNetwork] = []

    async def start(
        n: int = 3, national_system: str = BSN_SYSTEM, insecure: bool = False, **settings: Any
    ) -> RunningNetwork:
        root = tmp_path / f"net-{len(started)}"
        network_dir = None if insecure else root / "network"
        if network_dir is not None:
            init_network(network_dir, "Test network")
        registry = RegistryServer(root / "registry.db", network_dir=network_dir)
        await registry.start()
        net = RunningNetwork(root, registry, [], b"")
        started.append(net)
        if registry.network is not None:
            net.key = registry.network.network_key
            net.ca_pem = pki.pem(registry.network.ca_cert)
        else:
            net.key = new_network_key()
            write_network_key(root / "network.key", net.key)
        for i in range(n):
            folder = root / f"node-{i + 1}"
            settings = {"national_system": national_system, **settings}
            if insecure:
                config = NodeConfig(
                    node_id=f"node-{i + 1}", organisation_name=f"Facility {i + 1}",
                    registry=registry.address, database=folder / "node.db",
                    network_key_file=root / "network.key", insecure_dev=True, **settings,
                )  # fmt: skip
                folder.mkdir(parents=True, exist_ok=True)
            else:
                config = await join_node(registry, folder, i, **settings)
            node = NodeServer(config)
            await node.start()
            net.nodes.append(node)
            net.tokens.append(
                await Clinicians(node.store).add(CLINICIAN_ID, "Dr. Test", "physician")
            )
        return net

    yield start
    for net in started:
        await net.stop()


@pytest.fixture(scope="session")
def synthetic_bundles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("synthetic")
    generate(folder)
    return folder


async def collect(
    client: GatewayClient,
    identifier: str,
    purpose: str = "treatment",
    deadline_ms: int = 0,
    reason: str = "",
) -> tuple[Holders, dict[str, FacilityResult]]:
    """Run a search; the holders event and each facility's result by node id."""
    holders: Holders | None = None
    results: dict[str, FacilityResult] = {}
    async for event in client.search(identifier, purpose, deadline_ms, reason):
        if isinstance(event, Holders):
            assert holders is None, "holders event came twice"
            holders = event
        else:
            assert event.node_id not in results, f"{event.node_id} answered twice"
            results[event.node_id] = event
    assert holders is not None, "search stream did not open with the holders"
    return holders, results


async def wait_for(predicate: Callable[[], Awaitable[bool]], within_s: float = 10.0) -> None:
    """Poll ``predicate`` until true instead of sleeping a fixed time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not await predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def assert_registry_holds_no_identity(database: Path, bundles: list[Path]) -> None:
    """No identifier value, name or birth date of an input Patient is in the registry."""
    raw = database.read_bytes()
    wal = database.with_name(database.name + "-wal")
    if wal.exists():
        raw += wal.read_bytes()
    secrets: set[str] = set()
    for path in bundles:
        for entry in json.loads(path.read_bytes()).get("entry", []):
            resource = entry.get("resource", {})
            if resource.get("resourceType") != "Patient":
                continue
            secrets.update(i["value"] for i in resource.get("identifier", []))
            for name in resource.get("name", []):
                secrets.add(name.get("family", ""))
                secrets.update(name.get("given", []))
            secrets.add(resource.get("birthDate", ""))
    # Five bytes or more: shorter strings could turn up by chance in 32-byte pseudonyms.
    secrets = {s for s in secrets if len(s) >= 5}
    assert secrets, "found no patient data to look for"
    leaked = sorted(s for s in secrets if s.encode() in raw)
    assert not leaked, f"registry database contains patient data: {leaked[:5]}"
    with sqlite3.connect(database) as conn:
        assert conn.execute("SELECT count(*) FROM index_entries").fetchone()[0] > 0


def node_tls(config: NodeConfig) -> transport.TlsFiles | None:
    """The TLS files of a joined node (None for an --insecure-dev node)."""
    if config.insecure_dev:
        return None
    assert config.ca_certificate and config.certificate and config.private_key
    return transport.TlsFiles.load(config.ca_certificate, config.certificate, config.private_key)


async def publish_as(net: RunningNetwork, tls: transport.TlsFiles | None, node_id: str,
                     pseudonym: bytes, endpoint: str = "") -> None:  # fmt: skip
    """Register (when ``endpoint`` is given) and publish one entry as a node."""
    link = RegistryLink(net.registry.address, tls)
    try:
        if endpoint:
            await link.register(Facility(node_id, f"{node_id} facility", "", endpoint))
        await link.publish(node_id, [IndexChange(0, pseudonym, False)])
    finally:
        await link.close()


async def start_silent_peer(
    net: RunningNetwork, method: str, pseudonym: bytes, node_id: str = "hung"
) -> grpc.aio.Server:
    """A member facility whose ``Peer/<method>`` accepts the call and never answers.

    It has a real certificate from the test network's CA, serves mutual TLS
    and is listed in the registry as holding ``pseudonym``.
    """
    never = asyncio.Event()

    async def hang_unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await never.wait()
        return b""

    async def hang_stream(
        request: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        await never.wait()
        yield b""

    handler = (
        grpc.unary_stream_rpc_method_handler(hang_stream)
        if method == "FetchDocument"
        else grpc.unary_unary_rpc_method_handler(hang_unary)
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("transmural.v1.Peer", {method: handler})]
    )
    tls = None
    if net.registry.network is not None:
        network = net.registry.network
        key = pki.new_private_key()
        cert = pki.issue_node_certificate(
            network.ca_key, network.ca_cert, pki.make_csr(key, node_id), node_id,
            f"URA-{node_id}", f"{node_id} facility",
        )  # fmt: skip
        tls = transport.TlsFiles(pki.pem(network.ca_cert), pki.pem(cert), pki.key_pem(key))
    address = transport.bind(server, "127.0.0.1:0", tls)
    await server.start()
    await publish_as(net, tls, node_id, pseudonym, endpoint=address)
    return server
