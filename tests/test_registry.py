"""The registry as nodes see it: a real server on loopback, a real channel, no mocks."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from registry.index import NodeDirectory, NodeRecord
from registry.server import RegistryServer
from registry.service import SERVICE_NAME
from registry.store import RegistryStore
from transmural import const, transport
from transmural.errors import ConfigError
from transmural.v1 import common_pb2, registry_pb2, registry_pb2_grpc
from transmural.v1.registry_pb2_grpc import RegistryStub as Stub

REPO = Path(__file__).resolve().parents[1]


def pseudonym(i: int) -> bytes:
    return hashlib.sha256(f"test-patient-{i}".encode()).digest()


def node(node_id: str, port: int, name: str = "") -> common_pb2.NodeInfo:
    return common_pb2.NodeInfo(
        node_id=node_id,
        organisation_name=name or f"Facility {node_id}",
        organisation_id=f"URA-{port}",
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


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[RegistryServer]:
    server = RegistryServer(tmp_path / "registry.db")
    await server.start()
    yield server
    await server.stop(0)


@pytest.fixture
async def stub(registry: RegistryServer) -> AsyncIterator[Stub]:
    channel = transport.open_channel(registry.address)
    yield registry_pb2_grpc.RegistryStub(channel)
    await channel.close()


@pytest.fixture
async def two_nodes(stub: Stub) -> Stub:
    """Nodes ``alpha`` (port 7401) and ``beta`` (port 7402), registered."""
    await stub.RegisterNode(registry_pb2.RegisterNodeRequest(node=node("beta", 7402)))
    await stub.RegisterNode(registry_pb2.RegisterNodeRequest(node=node("alpha", 7401)))
    return stub


async def test_register_and_list_nodes(stub: Stub) -> None:
    response = await stub.RegisterNode(
        registry_pb2.RegisterNodeRequest(node=node("gp-west", 7401, "GP West"))
    )
    assert response.node == node("gp-west", 7401, "GP West")
    await stub.RegisterNode(registry_pb2.RegisterNodeRequest(node=node("hospital-1", 7402)))
    # Registering again updates the entry instead of adding one.
    await stub.RegisterNode(registry_pb2.RegisterNodeRequest(node=node("gp-west", 7409, "GP W")))

    listed = await stub.ListNodes(registry_pb2.ListNodesRequest())

    assert list(listed.nodes) == [node("gp-west", 7409, "GP W"), node("hospital-1", 7402)]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("node_id", "", "node_id is empty"),
        ("node_id", "Gp_West", "lowercase letters, digits and '-'"),
        ("node_id", "n" * 65, "1-64 characters"),
        ("endpoint", "localhost", "host:port"),
        ("endpoint", "localhost:0", "port must be a number from 1 to 65535"),
        ("endpoint", "localhost:70000", "port must be a number from 1 to 65535"),
        ("endpoint", "bad host:7400", "host must be"),
        ("organisation_name", "  ", "organisation_name is empty"),
        ("organisation_name", "x" * 201, "organisation_name is longer than 200"),
    ],
)
async def test_register_rejects_bad_node(stub: Stub, field: str, value: str, message: str) -> None:
    bad = node("gp-west", 7401)
    setattr(bad, field, value)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.RegisterNode(registry_pb2.RegisterNodeRequest(node=bad))

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (caught.value.details() or "")
    assert not (await stub.ListNodes(registry_pb2.ListNodesRequest())).nodes


async def test_publish_and_locate_across_two_nodes(two_nodes: Stub) -> None:
    stub = two_nodes
    alpha = await stub.Publish(publish("alpha", *range(0, 5000)))
    beta = await stub.Publish(publish("beta", *range(2500, 7500)))
    assert (alpha.published, alpha.withdrawn) == (5000, 0)
    assert (beta.published, beta.withdrawn) == (5000, 0)

    asked = [*random.Random(7).sample(range(7500), 998), 9_999_999, 10]
    response = await stub.Locate(
        registry_pb2.LocateRequest(pseudonyms=[pseudonym(i) for i in asked])
    )

    assert [loc.pseudonym for loc in response.locations] == [pseudonym(i) for i in asked]
    for i, location in zip(asked, response.locations, strict=True):
        expected = [n for n, held in (("alpha", i < 5000), ("beta", 2500 <= i < 7500)) if held]
        assert [h.node_id for h in location.holders] == expected
    endpoints = {h.node_id: h.endpoint for loc in response.locations for h in loc.holders}
    assert endpoints == {"alpha": "127.0.0.1:7401", "beta": "127.0.0.1:7402"}
    assert response.locations[0].holders[0].organisation_name.startswith("Facility ")


async def test_withdrawing_removes_only_that_holder(two_nodes: Stub) -> None:
    stub = two_nodes
    await stub.Publish(publish("alpha", 1, 2, 3))
    await stub.Publish(publish("beta", 2, 3))

    response = await stub.Publish(publish("alpha", 2, 99, withdrawn=True))

    assert (response.published, response.withdrawn) == (0, 2)
    assert await holders_of(stub, 1, 2, 3, 99) == [["alpha"], ["beta"], ["alpha", "beta"], []]


async def test_republishing_is_idempotent(two_nodes: Stub) -> None:
    stub = two_nodes
    first = await stub.Publish(publish("alpha", 1, 2))
    again = await stub.Publish(publish("alpha", 1, 2, 1))

    assert (first.published, again.published) == (2, 2)
    assert await holders_of(stub, 1, 2) == [["alpha"], ["alpha"]]


async def test_last_change_in_a_batch_wins(two_nodes: Stub) -> None:
    stub = two_nodes
    request = publish("alpha", 1, 2)
    request.entries.add(pseudonym=pseudonym(1), withdrawn=True)

    response = await stub.Publish(request)

    assert (response.published, response.withdrawn) == (1, 1)
    assert await holders_of(stub, 1, 2) == [[], ["alpha"]]


async def test_short_pseudonym_is_invalid_and_nothing_is_stored(two_nodes: Stub) -> None:
    stub = two_nodes
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


async def test_publishing_from_an_unregistered_node_is_not_found(two_nodes: Stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await two_nodes.Publish(publish("gamma", 1))

    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert caught.value.details() == "node 'gamma' is not registered; call RegisterNode first"
    assert await holders_of(two_nodes, 1) == [[]]


async def test_oversized_batches_are_refused(two_nodes: Stub) -> None:
    too_many = const.MAX_PUBLISH_BATCH + 1
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await two_nodes.Publish(publish("alpha", *range(too_many)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"at most {const.MAX_PUBLISH_BATCH} entries, not {too_many}" in (
        caught.value.details() or ""
    )

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await holders_of(two_nodes, *range(const.MAX_LOCATE_BATCH + 1))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_concurrent_publishes_and_locates_do_not_interfere(two_nodes: Stub) -> None:
    stub = two_nodes
    publishes = [
        stub.Publish(publish(node_id, *range(start, start + 500)))
        for start in range(0, 4000, 500)
        for node_id in ("alpha", "beta")
    ]
    locates = [holders_of(stub, *range(0, 4000, 7)) for _ in range(8)]

    await asyncio.gather(*publishes, *locates)

    assert await holders_of(stub, 0, 1999, 3999) == [["alpha", "beta"]] * 3


async def test_data_survives_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "registry.db"
    first = RegistryServer(db)
    await first.start()
    async with transport.open_channel(first.address) as channel:
        stub = registry_pb2_grpc.RegistryStub(channel)
        await stub.RegisterNode(registry_pb2.RegisterNodeRequest(node=node("alpha", 7401)))
        await stub.Publish(publish("alpha", 1, 2))
    await first.stop()

    second = RegistryServer(db)
    await second.start()
    try:
        async with transport.open_channel(second.address) as channel:
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
    server = RegistryServer(db)
    await server.start()
    async with transport.open_channel(server.address) as channel:
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
    }
    patient_words = ("patient", "identifier", "bsn", "ssn", "birth", "dob", "given", "family")
    every_column = {c for cols in columns.values() for c in cols}
    assert not [c for c in every_column for word in patient_words if word in c]
    # The only "name" is the facility's, in the node directory.
    assert [c for c in every_column if "name" in c] == ["organisation_name"]
    assert shapes == [("blob", 32)] * 100
    assert mode == "wal"


async def test_health_reports_serving(registry: RegistryServer) -> None:
    async with transport.open_channel(registry.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_an_address_in_use_is_a_config_error(
    registry: RegistryServer, tmp_path: Path
) -> None:
    second = RegistryServer(tmp_path / "other.db", listen=registry.address)
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


async def test_cli_serve_writes_ready_file_and_stops_on_sigterm(tmp_path: Path) -> None:
    ready = tmp_path / "ready.json"
    log_file = tmp_path / "registry.log"
    process = await run_cli(
        "serve", "--db", str(tmp_path / "r.db"), "--ready-file", str(ready),
        "--log-file", str(log_file), "--log-level", "debug",
    )  # fmt: skip
    try:
        await wait_for(ready.exists)
        announced = json.loads(ready.read_text())
        assert announced["pid"] == process.pid
        assert announced["address"].startswith("127.0.0.1:")
        async with transport.open_channel(announced["address"]) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME)
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            stub = registry_pb2_grpc.RegistryStub(channel)
            await stub.RegisterNode(registry_pb2.RegisterNodeRequest(node=node("alpha", 7401)))
            await stub.Publish(publish("alpha", *range(20)))
            assert await holders_of(stub, 3) == [["alpha"]]
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=10)

    assert process.returncode == 0, stderr.decode()
    assert not ready.exists()
    logged = log_file.read_text()
    assert "registry serving on" in logged
    assert "node alpha published 20 and withdrew 0 index entries" in logged
    # Not even at DEBUG does a pseudonym reach the log, in any spelling.
    for i in range(20):
        assert pseudonym(i).hex()[:16] not in logged
        assert repr(pseudonym(i))[2:26] not in logged
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve"], "the following arguments are required: --db"),
        (["serve", "--db", "x.db", "--log-level", "LOUD"], "invalid choice: 'LOUD'"),
        (["serve", "--db", "x.db", "--listen", "nowhere"], "cannot listen on 'nowhere'"),
        (["serve", "--db", "/nonexistent/dir/r.db"], "cannot open registry database"),
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
