"""The node's lifecycle: one process per database, clean failure at start."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
import os
from pathlib import Path

import pytest

from node.answers import Facility
from node.registry_link import RegistryLink
from node.server import NodeServer
from tests.conftest import NetworkFactory, node_tls, start_silent_peer
from tests.test_search import bsn_of
from tools.gateway_client import ClientError
from transmural import pki
from transmural.errors import ConfigError
from transmural.identifiers import BSN_SYSTEM, canonical
from transmural.pseudonym import new_network_key, write_network_key


async def test_second_node_on_same_database_refused(network: NetworkFactory) -> None:
    net = await network(n=1)
    twin = NodeServer(net.nodes[0].config)
    with pytest.raises(ConfigError, match="already running"):
        await twin.start()
    assert str(os.getpid()) in str(twin.config.database.with_name("node.db.lock").read_text())


async def test_another_nodes_database_is_refused(network: NetworkFactory) -> None:
    """A node.toml pointing at another node's database must not serve its records as ours."""
    net = await network(n=2)
    first, second = net.nodes
    await first.stop(0)
    borrowed = dataclasses.replace(second.config, database=first.config.database,
                                   listen="127.0.0.1:0", gateway_listen="127.0.0.1:0")  # fmt: skip
    with pytest.raises(ConfigError, match=r"belongs to node node-1 \(URA-90000001\), not node-2"):
        await NodeServer(borrowed).start()
    restarted = NodeServer(first.config)  # its own node still serves with it
    await restarted.start()
    await restarted.stop(0)


async def test_port_in_use_is_a_clear_error_and_releases_everything(
    network: NetworkFactory, tmp_path: Path
) -> None:
    net = await network(n=1)
    busy = net.nodes[0].address
    config = dataclasses.replace(net.nodes[0].config, database=tmp_path / "other.db", listen=busy)
    node = NodeServer(config)
    with pytest.raises(ConfigError, match="cannot listen on"):
        await node.start()
    # Everything was released: the same config starts once the port is free.
    free = NodeServer(dataclasses.replace(config, listen="127.0.0.1:0"))
    await free.start()
    await free.stop(0)


async def test_bad_network_key_file_mode_refused(network: NetworkFactory) -> None:
    net = await network(n=1)
    key_file = net.nodes[0].config.network_key_file
    key_file.chmod(0o644)
    node = NodeServer(dataclasses.replace(net.nodes[0].config, node_id="again"))
    with pytest.raises(ConfigError, match="readable by others"):
        await node.start()


async def test_fetch_from_a_frozen_facility_fails_within_the_deadline(
    network: NetworkFactory, synthetic_bundles: Path
) -> None:
    net = await network(n=1, peer_deadline_s=0.3)
    plan = await net.load(synthetic_bundles)
    bsn = bsn_of(plan, sorted(plan.patients)[0])
    pseudonym = net.pseudonymiser.pseudonym(canonical(BSN_SYSTEM, bsn))
    hung = await start_silent_peer(net, "FetchDocument", pseudonym, node_id="frozen")
    try:
        started = asyncio.get_running_loop().time()
        with pytest.raises(ClientError, match="frozen did not answer") as caught:
            await net.client(0).fetch(bsn, "frozen", "DocumentReference/x", io.BytesIO())
        elapsed = asyncio.get_running_loop().time() - started
    finally:
        await hung.stop(0)
    assert caught.value.exit_code == 5  # the network could not answer
    assert elapsed < 3.0


async def test_a_node_holding_another_networks_key_is_refused_by_the_registry(
    network: NetworkFactory, tmp_path: Path
) -> None:
    """Its pseudonyms could never be found: refused at registration, in words, not published."""
    net = await network(n=1)
    first = net.nodes[0]
    await first.stop(0)
    foreign = tmp_path / "foreign.key"
    write_network_key(foreign, new_network_key())
    node = NodeServer(dataclasses.replace(first.config, network_key_file=foreign))
    await node.start()
    net.nodes[0] = node
    with pytest.raises(ConfigError, match="network key is not this network's"):
        await node.publisher.publish_pending()
    # A node that sends no check (made before it was sent) is still registered.
    link = RegistryLink(net.registry.address, node_tls(first.config))
    try:
        await link.register(Facility("node-1", "Facility 1", "URA-90000001", "127.0.0.1:1"))
    finally:
        await link.close()


async def test_registry_lists_the_advertised_address(
    network: NetworkFactory, tmp_path: Path
) -> None:
    net = await network(n=1)
    first = net.nodes[0]
    await first.stop(0)
    advertised = dataclasses.replace(first.config, advertise="node-1.example.org:7100")
    node = NodeServer(advertised)
    await node.start()
    net.nodes[0] = node
    await node.publisher.publish_pending()
    link = RegistryLink(net.registry.address, node_tls(advertised))
    try:
        listed = {f.node_id: f.endpoint for f in await link.list_nodes()}
    finally:
        await link.close()
    assert listed["node-1"] == "node-1.example.org:7100"
    with pytest.raises(ConfigError, match="advertise"):
        dataclasses.replace(advertised, advertise="no-port")


async def test_warns_when_its_certificate_expires_soon(
    network: NetworkFactory, caplog: pytest.LogCaptureFixture
) -> None:
    net = await network(n=1)
    node = net.nodes[0]
    await node.stop(0)
    config = node.config
    assert net.registry.network and config.certificate and config.private_key
    key = pki.read_private_key(config.private_key)
    network_files = net.registry.network
    short = pki.issue_node_certificate(
        network_files.ca_key, network_files.ca_cert, pki.make_csr(key, config.node_id),
        config.node_id, config.organisation_id, config.organisation_name, days=10,
    )  # fmt: skip
    pki.write_certificate(config.certificate, short)
    restarted = NodeServer(config)
    with caplog.at_level(logging.WARNING, logger="node.server"):
        await restarted.start()
    net.nodes[0] = restarted
    assert any("expires on" in r.getMessage() and "renew" in r.getMessage() for r in caplog.records)


async def test_a_wildcard_listen_without_advertise_is_refused_before_binding(
    network: NetworkFactory,
) -> None:
    """Peers would be told to dial 0.0.0.0. (Refused before any port is bound: tests stay
    on loopback.)"""
    net = await network(n=1)
    first = net.nodes[0]
    await first.stop(0)
    for wildcard in ("0.0.0.0:7100", "[::]:7100"):
        node = NodeServer(dataclasses.replace(first.config, listen=wildcard))
        with pytest.raises(ConfigError, match=r'add advertise = "HOST:7100" to node.toml'):
            await node.start()
    dataclasses.replace(first.config, listen="0.0.0.0:7100", advertise="n1.example:7100") \
        .check_dialable()  # fmt: skip
