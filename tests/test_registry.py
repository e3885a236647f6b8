"""The registry as nodes see it: a real server on loopback, real channels, no mocks.

Protocol behaviour runs twice: against a registry with a network (mutual
TLS, each node calling with its own certificate minted from the test CA)
and against one run with ``--insecure-dev`` (plain gRPC, node ids on trust).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import signal
import socket
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from registry import const as registry_const
from registry import operator
from registry.index import NodeDirectory, NodeRecord
from registry.network import NetworkFiles, init_network
from registry.server import RegistryServer
from registry.service import SERVICE_NAME
from registry.store import RegistryStore
from tests.registry_pki import mint_node, registry_channel
from tools.join import join
from transmural import const, invite, transport
from transmural.errors import ConfigError
from transmural.v1 import common_pb2, registry_pb2, registry_pb2_grpc
from transmural.v1.registry_pb2_grpc import RegistryStub as Stub

REPO = Path(__file__).resolve().parents[1]


def pseudonym(i: int) -> bytes:
    return hashlib.sha256(f"test-patient-{i}".encode()).digest()


def node(node_id: str, port: int) -> common_pb2.NodeInfo:
    """A directory entry; its organisation is what ``mint_node`` writes into certificates."""
    return common_pb2.NodeInfo(
        node_id=node_id,
        organisation_name=f"Facility {node_id}",
        organisation_id=f"URA-{node_id}",
        endpoint=f"127.0.0.1:{port}",
    )


def publish(node_id: str, *ids: int, withdrawn: bool = False) -> registry_pb2.PublishRequest:
    return registry_pb2.PublishRequest(
        node_id=node_id,
        entries=[registry_pb2.IndexEntry(pseudonym=pseudonym(i), withdrawn=withdrawn) for i in ids],
    )


async def holders_of(stub: Stub, *ids: int) -> list[list[str]]:
    response = await stub.Locate(registry_pb2.LocateRequest(pseudonyms=[pseudonym(i) for i in ids]))
    return [[h.node_id for h in location.holders] for location in response.locations]


async def wait_for(predicate: Callable[[], bool], seconds: float = 10.0) -> None:
    """Poll ``predicate`` until true; fail the test after ``seconds``."""
    try:
        async with asyncio.timeout(seconds):
            while True:  # a file appearing has no event to await
                if predicate():
                    return
                await asyncio.sleep(0.02)
    except TimeoutError:
        pytest.fail(f"condition not met within {seconds} s")


@dataclass
class Fleet:
    """Stubs to one registry, each presenting one node's certificate (one shared under
    ``--insecure-dev``, where the node id in the request is all there is)."""

    registry: RegistryServer
    network: NetworkFiles | None
    channels: dict[str, grpc.aio.Channel] = field(default_factory=dict)

    def __call__(self, node_id: str = "observer") -> Stub:
        key = node_id if self.network else ""
        if key not in self.channels:
            tls = mint_node(self.network, node_id) if self.network else None
            self.channels[key] = registry_channel(self.registry.address, tls)
        return registry_pb2_grpc.RegistryStub(self.channels[key])

    @property
    def channel(self) -> grpc.aio.Channel:
        self()
        return next(iter(self.channels.values()))

    async def close(self) -> None:
        for channel in self.channels.values():
            await channel.close()


@pytest.fixture(params=["mtls", "insecure-dev"])
async def fleet(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Fleet]:
    network = init_network(tmp_path / "network", "Test") if request.param == "mtls" else None
    server = RegistryServer(
        tmp_path / "registry.db", network_dir=network.folder if network else None
    )
    await server.start()
    nodes = Fleet(server, network)
    yield nodes
    await nodes.close()
    await server.stop(0)


@pytest.fixture
def stub(fleet: Fleet) -> Stub:
    """A stub of a node that only reads (Locate, ListNodes)."""
    return fleet()


@pytest.fixture
async def two_nodes(fleet: Fleet) -> Fleet:
    """Nodes ``alpha`` (port 7401) and ``beta`` (port 7402), registered."""
    await fleet("beta").RegisterNode(registry_pb2.RegisterNodeRequest(node=node("beta", 7402)))
    await fleet("alpha").RegisterNode(registry_pb2.RegisterNodeRequest(node=node("alpha", 7401)))
    return fleet


async def test_register_and_list_nodes(fleet: Fleet) -> None:
    response = await fleet("gp-west").RegisterNode(
        registry_pb2.RegisterNodeRequest(node=node("gp-west", 7401))
    )
    assert response.node == node("gp-west", 7401)
    await fleet("hospital-1").RegisterNode(
        registry_pb2.RegisterNodeRequest(node=node("hospital-1", 7402))
    )
    # Registering again updates the entry instead of adding one.
    await fleet("gp-west").RegisterNode(
        registry_pb2.RegisterNodeRequest(node=node("gp-west", 7409))
    )

    listed = await fleet().ListNodes(registry_pb2.ListNodesRequest())

    assert list(listed.nodes) == [node("gp-west", 7409), node("hospital-1", 7402)]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("localhost", "host:port"),
        ("localhost:0", "port must be a number from 1 to 65535"),
        ("localhost:70000", "port must be a number from 1 to 65535"),
        ("bad host:7400", "host must be"),
    ],
)
async def test_register_rejects_a_bad_endpoint(fleet: Fleet, value: str, message: str) -> None:
    bad = node("gp-west", 7401)
    bad.endpoint = value

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await fleet("gp-west").RegisterNode(registry_pb2.RegisterNodeRequest(node=bad))

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (caught.value.details() or "")
    assert not (await fleet().ListNodes(registry_pb2.ListNodesRequest())).nodes


@pytest.fixture
async def insecure_stub(tmp_path: Path) -> AsyncIterator[Stub]:
    """A registry run with --insecure-dev, where node and organisation come from the request."""
    server = RegistryServer(tmp_path / "registry.db")
    await server.start()
    channel = transport.open_channel(server.address, None)
    yield registry_pb2_grpc.RegistryStub(channel)
    await channel.close()
    await server.stop(0)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("node_id", "", "node_id is empty"),
        ("node_id", "Gp_West", "lowercase letters, digits and '-'"),
        ("node_id", "n" * 65, "1-64 characters"),
        ("organisation_name", "  ", "organisation_name is empty"),
        ("organisation_name", "x" * 201, "organisation_name is longer than 200"),
    ],
)
async def test_insecure_dev_checks_the_claimed_identity(
    insecure_stub: Stub, field: str, value: str, message: str
) -> None:
    bad = node("gp-west", 7401)
    setattr(bad, field, value)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await insecure_stub.RegisterNode(registry_pb2.RegisterNodeRequest(node=bad))

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (caught.value.details() or "")
    assert not (await insecure_stub.ListNodes(registry_pb2.ListNodesRequest())).nodes


async def test_second_registry_on_same_database_refused(tmp_path: Path) -> None:
    """Two registries on one database would hand out two views of revocations and invites."""
    first = RegistryServer(tmp_path / "registry.db")
    await first.start()
    try:
        twin = RegistryServer(tmp_path / "registry.db")
        with pytest.raises(ConfigError, match=r"this registry is already running \(pid \d+"):
            await twin.start()
        (tmp_path / "alias.db").symlink_to(tmp_path / "registry.db")
        with pytest.raises(ConfigError, match="this registry is already running"):
            await RegistryServer(tmp_path / "alias.db").start()  # the same file by another name
        await twin.stop(0)  # nothing of the twin's to stop; the first keeps serving
        channel = transport.open_channel(first.address, None)
        nodes = await registry_pb2_grpc.RegistryStub(channel).ListNodes(
            registry_pb2.ListNodesRequest()
        )
        await channel.close()
        assert list(nodes.nodes) == []
    finally:
        await first.stop(0)
    restarted = RegistryServer(tmp_path / "registry.db")  # the lock went with the first
    await restarted.start()
    await restarted.stop(0)


async def test_a_database_serves_only_its_own_network(tmp_path: Path) -> None:
    """Another network's folder beside this database would issue, verify and invite wrongly."""
    ours = init_network(tmp_path / "ours", "Ours")
    theirs = init_network(tmp_path / "theirs", "Theirs")
    db = tmp_path / "registry.db"
    first = RegistryServer(db, network_dir=ours.folder)
    await first.start()
    await first.stop(0)
    wrong = RegistryServer(db, network_dir=theirs.folder)
    with pytest.raises(ConfigError, match=r"belongs to network 'Ours' .* not to 'Theirs'"):
        await wrong.start()
    with pytest.raises(ConfigError, match="belongs to network 'Ours'"):
        await operator.invite(theirs.folder, db, "URA-1", "GP West")
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM invites").fetchone() == (0,)
    token = await operator.invite(ours.folder, db, "URA-1", "GP West")  # its own still works
    assert invite.decode(token).ca_fingerprint == ours.ca_fingerprint
    again = RegistryServer(db, network_dir=ours.folder)
    await again.start()
    await again.stop(0)


async def test_with_mtls_the_certificate_names_the_node(tmp_path: Path) -> None:
    network = init_network(tmp_path / "network", "Test")
    server = RegistryServer(tmp_path / "registry.db", network_dir=network.folder)
    await server.start()
    tls = mint_node(network, "gp-west", "URA-1", "GP West")
    try:
        async with registry_channel(server.address, tls) as channel:
            stub = registry_pb2_grpc.RegistryStub(channel)
            claimed = common_pb2.NodeInfo(
                organisation_name="Not Us", organisation_id="URA-9", endpoint="127.0.0.1:7401"
            )
            reply = await stub.RegisterNode(registry_pb2.RegisterNodeRequest(node=claimed))
            published = await stub.Publish(registry_pb2.PublishRequest(entries=[]))
    finally:
        await server.stop(0)

    assert reply.node == common_pb2.NodeInfo(
        node_id="gp-west",
        organisation_name="GP West",
        organisation_id="URA-1",
        endpoint="127.0.0.1:7401",
    )
    assert (published.published, published.withdrawn) == (0, 0)


async def test_publish_and_locate_across_two_nodes(two_nodes: Fleet) -> None:
    alpha = await two_nodes("alpha").Publish(publish("alpha", *range(0, 5000)))
    beta = await two_nodes("beta").Publish(publish("beta", *range(2500, 7500)))
    assert (alpha.published, alpha.withdrawn) == (5000, 0)
    assert (beta.published, beta.withdrawn) == (5000, 0)

    asked = [*random.Random(7).sample(range(7500), 998), 9_999_999, 10]
    response = await two_nodes().Locate(
        registry_pb2.LocateRequest(pseudonyms=[pseudonym(i) for i in asked])
    )

    assert [loc.pseudonym for loc in response.locations] == [pseudonym(i) for i in asked]
    for i, location in zip(asked, response.locations, strict=True):
        expected = [n for n, held in (("alpha", i < 5000), ("beta", 2500 <= i < 7500)) if held]
        assert [h.node_id for h in location.holders] == expected
    endpoints = {h.node_id: h.endpoint for loc in response.locations for h in loc.holders}
    assert endpoints == {"alpha": "127.0.0.1:7401", "beta": "127.0.0.1:7402"}
    assert response.locations[0].holders[0].organisation_name.startswith("Facility ")


async def test_withdrawing_removes_only_that_holder(two_nodes: Fleet) -> None:
    await two_nodes("alpha").Publish(publish("alpha", 1, 2, 3))
    await two_nodes("beta").Publish(publish("beta", 2, 3))

    response = await two_nodes("alpha").Publish(publish("alpha", 2, 99, withdrawn=True))

    assert (response.published, response.withdrawn) == (0, 2)
    assert await holders_of(two_nodes(), 1, 2, 3, 99) == [
        ["alpha"],
        ["beta"],
        ["alpha", "beta"],
        [],
    ]


async def test_republishing_is_idempotent(two_nodes: Fleet) -> None:
    stub = two_nodes("alpha")
    first = await stub.Publish(publish("alpha", 1, 2))
    again = await stub.Publish(publish("alpha", 1, 2, 1))

    assert (first.published, again.published) == (2, 2)
    assert await holders_of(stub, 1, 2) == [["alpha"], ["alpha"]]


async def test_last_change_in_a_batch_wins(two_nodes: Fleet) -> None:
    request = publish("alpha", 1, 2)
    request.entries.add(pseudonym=pseudonym(1), withdrawn=True)

    response = await two_nodes("alpha").Publish(request)

    assert (response.published, response.withdrawn) == (1, 1)
    assert await holders_of(two_nodes(), 1, 2) == [[], ["alpha"]]


async def test_short_pseudonym_is_invalid_and_nothing_is_stored(two_nodes: Fleet) -> None:
    stub = two_nodes("alpha")
    request = publish("alpha", 1)
    request.entries.add(pseudonym=pseudonym(2)[:31])

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Publish(request)

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "entry 1: a pseudonym is 32 bytes (HMAC-SHA256), not 31"
    assert await holders_of(stub, 1) == [[]]

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Locate(registry_pb2.LocateRequest(pseudonyms=[pseudonym(1), b"x" * 31]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "32 bytes" in (caught.value.details() or "")


async def test_publishing_from_an_unregistered_node_is_not_found(two_nodes: Fleet) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await two_nodes("gamma").Publish(publish("gamma", 1))

    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert caught.value.details() == "node 'gamma' is not registered; call RegisterNode first"
    assert await holders_of(two_nodes(), 1) == [[]]


async def test_oversized_batches_are_refused(two_nodes: Fleet) -> None:
    too_many = const.MAX_PUBLISH_BATCH + 1
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await two_nodes("alpha").Publish(publish("alpha", *range(too_many)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"at most {const.MAX_PUBLISH_BATCH} entries, not {too_many}" in (
        caught.value.details() or ""
    )

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await holders_of(two_nodes(), *range(const.MAX_LOCATE_BATCH + 1))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_concurrent_publishes_and_locates_do_not_interfere(two_nodes: Fleet) -> None:
    publishes = [
        two_nodes(node_id).Publish(publish(node_id, *range(start, start + 500)))
        for start in range(0, 4000, 500)
        for node_id in ("alpha", "beta")
    ]
    locates = [holders_of(two_nodes(), *range(0, 4000, 7)) for _ in range(8)]

    await asyncio.gather(*publishes, *locates)

    assert await holders_of(two_nodes(), 0, 1999, 3999) == [["alpha", "beta"]] * 3


async def test_data_survives_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "registry.db"
    network = init_network(tmp_path / "network", "Test")
    alpha = mint_node(network, "alpha")
    first = RegistryServer(db, network_dir=network.folder)
    await first.start()
    async with registry_channel(first.address, alpha) as channel:
        stub = registry_pb2_grpc.RegistryStub(channel)
        await stub.RegisterNode(registry_pb2.RegisterNodeRequest(node=node("alpha", 7401)))
        await stub.Publish(publish("alpha", 1, 2))
    await first.stop()

    second = RegistryServer(db, network_dir=network.folder)
    await second.start()
    try:
        async with registry_channel(second.address, alpha) as channel:
            stub = registry_pb2_grpc.RegistryStub(channel)
            listed = await stub.ListNodes(registry_pb2.ListNodesRequest())
            assert list(listed.nodes) == [node("alpha", 7401)]
            assert await holders_of(stub, 1, 2, 3) == [["alpha"], ["alpha"], []]
    finally:
        await second.stop()


def read_schema(db: Path) -> tuple[dict[str, set[str]], list[tuple[str, int]], str]:
    """Tables with their columns, (type, length) of every stored pseudonym, journal mode."""
    with sqlite3.connect(db) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        columns = {t: {c[1] for c in conn.execute(f"PRAGMA table_info({t})")} for t in tables}
        shapes = conn.execute(
            "SELECT typeof(pseudonym), length(pseudonym) FROM index_entries"
        ).fetchall()
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    conn.close()
    return columns, shapes, mode


async def test_database_holds_only_pseudonyms_node_ids_and_times(tmp_path: Path) -> None:
    db = tmp_path / "registry.db"
    network = init_network(tmp_path / "network", "Test")
    server = RegistryServer(db, network_dir=network.folder)
    await server.start()
    assert server.membership is not None and server.join_address is not None
    token = await server.membership.create_invite("URA-1", "Facility", "alpha", "")
    async with registry_channel(server.address, mint_node(network, "alpha")) as channel:
        stub = registry_pb2_grpc.RegistryStub(channel)
        await stub.RegisterNode(registry_pb2.RegisterNodeRequest(node=node("alpha", 7401)))
        await stub.Publish(publish("alpha", *range(100)))
    await server.stop()

    columns, shapes, mode = await asyncio.to_thread(read_schema, db)

    assert columns == {
        "schema_version": {"version", "applied_at"},
        "nodes": {
            "node_id",
            "organisation_name",
            "organisation_id",
            "endpoint",
            "registered_at",
            "updated_at",
        },
        "index_entries": {"pseudonym", "node_id", "updated_at"},
        "invites": {
            "secret_hash",
            "node_id",
            "organisation_id",
            "organisation_name",
            "created_at",
            "expires_at",
            "used_at",
            "organisation_category",
            "closed_at",
            "closed_because",
        },
        "certificates": {"serial", "node_id", "organisation_id", "issued_at", "not_after"},
        "revocations": {"serial", "node_id", "organisation_id", "revoked_at"},
        "network_identity": {"only_row", "ca_fingerprint", "network_name", "bound_at"},
    }
    # Not the invite secret either: only its SHA-256.
    secret = invite.decode(token).secret
    assert secret not in await asyncio.to_thread(db.read_bytes)
    patient_words = ("patient", "identifier", "bsn", "ssn", "birth", "dob", "given", "family")
    every_column = {c for cols in columns.values() for c in cols}
    assert not [c for c in every_column for word in patient_words if word in c]
    # The only names are the facility's (directory, invite) and the network's.
    assert {c for c in every_column if "name" in c} == {"organisation_name", "network_name"}
    assert shapes == [("blob", 32)] * 100
    assert mode == "wal"


async def test_health_reports_serving(fleet: Fleet) -> None:
    health = health_pb2_grpc.HealthStub(fleet.channel)
    for service in ("", SERVICE_NAME):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_an_address_in_use_is_a_config_error(fleet: Fleet, tmp_path: Path) -> None:
    second = RegistryServer(tmp_path / "other.db", listen=fleet.registry.address)
    with pytest.raises(ConfigError, match="cannot listen on"):
        await second.start()
    with pytest.raises(ConfigError, match="port from 0 to 65535"):
        RegistryServer(tmp_path / "other.db", listen="127.0.0.1:99999")


async def run_cli(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "registry.cli",
        *args,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def stop_cli(process: asyncio.subprocess.Process) -> str:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=10)
    return stderr.decode()


async def test_cli_serve_writes_ready_file_and_stops_on_sigterm(tmp_path: Path) -> None:
    ready = tmp_path / "ready.json"
    log_file = tmp_path / "registry.log"
    network = init_network(tmp_path / "network", "Test")
    process = await run_cli(
        "serve", "--db", str(tmp_path / "r.db"), "--network-dir", str(network.folder),
        "--ready-file", str(ready), "--log-file", str(log_file), "--log-level", "debug",
    )  # fmt: skip
    try:
        await wait_for(ready.exists)
        announced = json.loads(ready.read_text())
        assert announced["pid"] == process.pid
        assert announced["address"].startswith("127.0.0.1:")
        assert announced["join_address"].startswith("127.0.0.1:")
        assert announced["join_address"] != announced["address"]
        # A node joins through the join port, then calls the mutual-TLS port as itself.
        token = await operator.invite(
            network.folder, tmp_path / "r.db", "URA-1", "Facility alpha", "alpha",
            announced["join_address"],
        )  # fmt: skip
        joined = await join(token, tmp_path / "alpha")
        assert joined.registry_endpoint == announced["address"]
        tls = transport.TlsFiles.load(
            joined.paths.ca_cert, joined.paths.node_cert, joined.paths.node_key
        )
        async with registry_channel(joined.registry_endpoint, tls) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME)
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            stub = registry_pb2_grpc.RegistryStub(channel)
            await stub.RegisterNode(registry_pb2.RegisterNodeRequest(node=node("alpha", 7401)))
            await stub.Publish(publish("alpha", *range(20)))
            assert await holders_of(stub, 3) == [["alpha"]]
    finally:
        stderr = await stop_cli(process)

    assert process.returncode == 0, stderr
    assert not ready.exists()
    logged = log_file.read_text()
    assert "registry serving on" in logged
    assert "node alpha of organisation URA-1 joined" in logged
    assert "node alpha published 20 and withdrew 0 index entries" in logged
    # Not even at DEBUG does a pseudonym reach the log, in any spelling.
    for i in range(20):
        assert pseudonym(i).hex()[:16] not in logged
        assert repr(pseudonym(i))[2:26] not in logged
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


async def test_cli_serve_insecure_dev_has_no_join_port(tmp_path: Path) -> None:
    ready = tmp_path / "ready.json"
    process = await run_cli(
        "serve", "--db", str(tmp_path / "r.db"), "--insecure-dev", "--ready-file", str(ready)
    )
    try:
        await wait_for(ready.exists)
        announced = json.loads(ready.read_text())
        assert set(announced) == {"address", "pid"}
        async with transport.open_channel(announced["address"], None) as channel:
            stub = registry_pb2_grpc.RegistryStub(channel)
            await stub.RegisterNode(registry_pb2.RegisterNodeRequest(node=node("alpha", 7401)))
            assert [
                n.node_id for n in (await stub.ListNodes(registry_pb2.ListNodesRequest())).nodes
            ] == ["alpha"]
    finally:
        stderr = await stop_cli(process)
    assert process.returncode == 0, stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve"], "the following arguments are required: --db"),
        (["serve", "--db", "x.db"], "give exactly one of --network-dir DIR or --insecure-dev"),
        (
            ["serve", "--db", "x.db", "--insecure-dev", "--network-dir", "net"],
            "give exactly one of --network-dir DIR or --insecure-dev",
        ),
        (["serve", "--db", "x.db", "--network-dir", "nowhere"], "there is no network folder"),
        (["serve", "--db", "x.db", "--log-level", "LOUD"], "invalid choice: 'LOUD'"),
        (
            ["serve", "--db", "x.db", "--insecure-dev", "--listen", "nowhere"],
            "cannot listen on 'nowhere'",
        ),
        (
            ["serve", "--db", "/nonexistent/dir/r.db", "--insecure-dev"],
            "cannot open registry database",
        ),
        (
            ["serve", "--db", "x.db", "--insecure-dev", "--advertise-on", "127.0.0.1"],
            "only a registry with a network can advertise",
        ),
    ],
)
async def test_cli_errors_are_one_line_and_exit_2(
    args: list[str], message: str, tmp_path: Path
) -> None:
    process = await run_cli(*[a.replace("x.db", str(tmp_path / "x.db")) for a in args])
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=10)

    lines = stderr.decode().strip().splitlines()
    assert process.returncode == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith("transmural-registry")
    assert message in lines[0]


async def test_a_port_in_use_is_one_line_naming_why(tmp_path: Path) -> None:
    """Not grpc's C-core ERROR line first: the operator reads one sentence."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for host in ("127.0.0.1", "localhost"):  # localhost: grpc would serve on ::1 alone
            listen = ["--listen", f"{host}:{port}", "--log-level", "WARNING"]
            process = await run_cli("serve", "--db", str(tmp_path / "r.db"), "--insecure-dev",
                                    *listen)  # fmt: skip
            _, stderr = await asyncio.wait_for(process.communicate(), timeout=10)
            assert process.returncode == 2
            (line,) = stderr.decode().splitlines()
            said = f"cannot listen on {host}:{port}: 127.0.0.1 port {port}: in use (by another"
            assert line.startswith(f"transmural-registry: error: {said}"), line
    process = await run_cli("serve", "--db", str(tmp_path / "r.db"), "--insecure-dev",
                            "--listen", "nowhere.invalid:7000")  # fmt: skip
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=10)
    assert process.returncode == 2
    assert stderr.decode().splitlines()[-1].endswith("nowhere.invalid does not resolve")


async def test_reregistering_at_another_endpoint_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = await RegistryStore.open(tmp_path / "registry.db")
    try:
        directory = NodeDirectory(store)
        await directory.register(NodeRecord("node-1", "Facility", "ura-1", "127.0.0.1:7001"))
        with caplog.at_level(logging.WARNING, logger="registry.index"):
            await directory.register(NodeRecord("node-1", "Facility", "ura-1", "127.0.0.1:7001"))
            assert not caplog.records
            await directory.register(NodeRecord("node-1", "Facility", "ura-1", "127.0.0.1:7002"))
        (warning,) = caplog.records
        assert "127.0.0.1:7002 replaces 127.0.0.1:7001" in warning.getMessage()
    finally:
        await store.close()


async def test_one_node_cannot_take_every_slot_at_the_registry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry_const, "MAX_CALLS_PER_NODE", 1)
    network = init_network(tmp_path / "network", "Test")
    server = RegistryServer(tmp_path / "registry.db", network_dir=network.folder)
    await server.start()
    fleet = Fleet(server, network)
    try:
        await fleet("alpha").RegisterNode(
            registry_pb2.RegisterNodeRequest(node=node("alpha", 7401))
        )
        await fleet("alpha").Publish(publish("alpha", *range(1000)))
        many = registry_pb2.LocateRequest(pseudonyms=[pseudonym(i) for i in range(1000)])

        async def locate(node_id: str) -> grpc.StatusCode:
            try:
                await fleet(node_id).Locate(many)
            except grpc.aio.AioRpcError as error:
                assert "your node already has 1 calls running at the registry" in (
                    error.details() or ""
                ), error
                return error.code()
            return grpc.StatusCode.OK

        # alpha asks 50 at once, each over 1000 pseudonyms; beta asks once meanwhile.
        codes = await asyncio.gather(*(locate("alpha") for _ in range(50)), locate("beta"))
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes[:50]  # alpha over its share ...
        assert grpc.StatusCode.OK in codes[:50]
        assert codes[50] is grpc.StatusCode.OK  # ... while beta is served
        assert await locate("alpha") is grpc.StatusCode.OK  # its places came back
    finally:
        await fleet.close()
        await server.stop(0)
