"""A registry and joined nodes in this process, as the tests' ``network`` fixture starts them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from node.config import NodeConfig
from node.consent_desk import ConsentDesk
from node.ingest import ingest_folder
from node.server import NodeServer
from node.users import Clinicians
from registry.network import init_network
from registry.server import RegistryServer
from tools.gateway_client import GatewayClient, NodeAccess
from tools.join import join
from transmural import pki
from transmural.identifiers import BSN_SYSTEM
from transmural.pseudonym import Pseudonymiser


@dataclass
class BenchNetwork:
    root: Path
    registry: RegistryServer
    nodes: list[NodeServer] = field(default_factory=list)
    clients: list[GatewayClient] = field(default_factory=list)

    async def load(self, node: NodeServer, *folders: Path) -> None:
        """Ingest ``folders`` into ``node``, consent everyone to all sharing, publish."""
        assert self.registry.network is not None
        pseudonymiser = Pseudonymiser(self.registry.network.network_key)
        for folder in folders:
            _, errors = await ingest_folder(node.store, folder, pseudonymiser, BSN_SYSTEM)
            assert not errors, errors
        desk = ConsentDesk(node.store)
        await desk.record([desk.blanket(p.patient_key, True, "bench")
                           for p in await node.store.patients()])  # fmt: skip
        await node.publisher.publish_pending()

    async def client(self, index: int = 0) -> GatewayClient:
        """A clinician's client of node ``index``'s gateway."""
        assert self.registry.network is not None
        node = self.nodes[index]
        token = await Clinicians(node.store).add(f"bench-{len(self.clients)}", "Dr. B", "physician")
        ca = pki.pem(self.registry.network.ca_cert)
        client = GatewayClient(NodeAccess(node.gateway_address, token, ca, node.config.node_id))
        self.clients.append(client)
        return client


async def _node(registry: RegistryServer, folder: Path, index: int) -> NodeServer:
    assert registry.membership is not None and registry.join_address
    node_id = f"node-{index + 1}"
    token = await registry.membership.create_invite(
        f"URA-{90000000 + index + 1}", f"Facility {index + 1}", node_id, registry.join_address
    )
    joined = await join(token, folder)
    node = NodeServer(NodeConfig(
        node_id=joined.node_id, organisation_name=joined.organisation_name,
        organisation_id=joined.organisation_id, registry=joined.registry_endpoint,
        database=folder / "node.db", network_key_file=joined.paths.network_key,
        certificate=joined.paths.node_cert, private_key=joined.paths.node_key,
        ca_certificate=joined.paths.ca_cert,
    ))  # fmt: skip
    await node.start()
    return node


@asynccontextmanager
async def bench_network(root: Path, nodes: int) -> AsyncIterator[BenchNetwork]:
    """A registry and ``nodes`` joined nodes on 127.0.0.1, mutual TLS, in this process."""
    init_network(root / "network", "Bench network")
    registry = RegistryServer(root / "registry.db", network_dir=root / "network")
    await registry.start()
    net = BenchNetwork(root, registry)
    try:
        for i in range(nodes):
            net.nodes.append(await _node(registry, root / f"node-{i + 1}", i))
        yield net
    finally:
        for client in net.clients:
            await client.close()
        for node in net.nodes:
            await node.stop(0)
        await registry.stop(0)
