"""The ``transmural`` command as a clinician runs it, against a real network."""

from __future__ import annotations

import asyncio
import io
import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from tests.conftest import NetworkFactory, RunningNetwork
from tests.test_search import at_least, bsn_of
from tools import gateway_client
from tools.gateway_client import ClientError, GatewayClient, NodeAccess, search_timeout_s
from transmural import pki, transport
from transmural.v1 import common_pb2


async def transmural(*args: str) -> tuple[int, str, str]:
    """Run the client as a separate process without blocking the servers' loop."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tools.clinician", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def loaded(network: NetworkFactory, bundles: Path) -> tuple[RunningNetwork, str]:
    net = await network(n=3)
    plan = await net.load(bundles)
    await net.consent_all(True)
    return net, bsn_of(plan, at_least(plan, 2)[0])


def signed_in(net: RunningNetwork, index: int = 0) -> list[str]:
    """The flags that reach node ``index``'s gateway as its test clinician."""
    assert net.ca_pem is not None
    ca_file = net.root / "ca-for-client.crt"
    ca_file.write_bytes(net.ca_pem)
    access = net.access(index)
    return ["--node", access.address, "--token", access.token, "--ca", str(ca_file),
            "--node-id", access.node_id]  # fmt: skip


async def test_search_json_with_options_after_the_command(
    network: NetworkFactory, synthetic_bundles: Path
) -> None:
    net, bsn = await loaded(network, synthetic_bundles)
    code, out, err = await transmural("search", bsn, "--json", *signed_in(net))
    assert code == 0, err
    answer = json.loads(out)
    assert len(answer["facilities"]) >= 2
    assert {f["status"] for f in answer["facilities"]} == {"ok"}


async def test_registry_down_is_exit_5_not_no_records_nor_your_node(
    network: NetworkFactory, synthetic_bundles: Path
) -> None:
    """Exit 1 means "no facility knows the patient": a program must not read that
    while the registry is down and no holders are remembered."""
    net, bsn = await loaded(network, synthetic_bundles)
    await net.registry.stop(0)
    for command in (["search", bsn], ["search", bsn, "--json"], ["report", bsn, "--json"]):
        code, out, err = await transmural(*signed_in(net), *command)
        assert code == 5, (command, err)
        assert "registry" in err and "cannot reach your node" not in err
        assert out == ""


async def test_fetch_from_a_facility_that_is_down_is_exit_5(
    network: NetworkFactory, synthetic_bundles: Path, tmp_path: Path
) -> None:
    net, bsn = await loaded(network, synthetic_bundles)
    code, out, err = await transmural(*signed_in(net), "search", bsn, "--json")
    assert code == 0, err
    remote = next(f for f in json.loads(out)["facilities"] if f["node_id"] != "node-1")
    await next(n for n in net.nodes if n.config.node_id == remote["node_id"]).stop(0)
    code, _, err = await transmural(
        *signed_in(net), "fetch", bsn, "--facility", remote["node_id"],
        "--document", remote["documents"][0]["document_id"], "-o", str(tmp_path / "note"),
    )  # fmt: skip
    assert code == 5, err
    assert remote["node_id"] in err and "your node" not in err
    assert not (tmp_path / "note").exists()


async def test_node_not_running_exit_3(network: NetworkFactory) -> None:
    net = await network(n=1)
    flags = signed_in(net)
    flags[1] = "127.0.0.1:1"
    code, _, err = await transmural(*flags, "search", "111222333")
    assert code == 3
    assert "cannot reach your node at 127.0.0.1:1: connection refused" in err
    assert "CA" not in err and "certificate" not in err


async def test_a_hung_node_is_said_to_not_answer_within_seconds(tmp_path: Path) -> None:
    """A node that accepts connections and never speaks (a stopped process: the
    kernel still accepts): every command gives up after ~5 s and says so, rather
    than waiting grpc's 20 s and blaming the CA or node id."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client goes away; never a byte back
        writer.close()

    _, ca_cert = pki.create_ca("Hung network")
    ca_file = tmp_path / "ca.crt"
    pki.write_certificate(ca_file, ca_cert)
    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    flags = ["--node", address, "--token", "tmu1_x", "--ca", str(ca_file), "--node-id", "node-1"]
    commands = [
        ["search", "111222333"],
        ["report", "111222333"],
        ["fetch", "111222333", "--facility", "node-2", "--document", "d", "-o", "-"],
        ["login", "--config", str(tmp_path / "client.json")],
    ]
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with server:
        runs = await asyncio.gather(*(transmural(*flags, *command) for command in commands))
    elapsed = loop.time() - started
    for command, (code, _, err) in zip(commands, runs, strict=True):
        assert code == 3, (command, err)
        assert f"your node at {address} did not answer in time" in err, (command, err)
        assert "CA" not in err, (command, err)
    assert elapsed < 15, f"took {elapsed:.1f} s: grpc's own 20 s connect timeout, not ours"
    assert not (tmp_path / "client.json").exists()


async def test_fetch_to_stdout_and_to_missing_folder(
    network: NetworkFactory, synthetic_bundles: Path, tmp_path: Path
) -> None:
    net, bsn = await loaded(network, synthetic_bundles)
    node = signed_in(net)
    code, out, _ = await transmural(*node, "search", bsn, "--json")
    facility = json.loads(out)["facilities"][0]
    document = facility["documents"][0]
    fetch = [*node, "fetch", bsn, "--facility", facility["node_id"],
             "--document", document["document_id"]]  # fmt: skip

    code, out, err = await transmural(*fetch, "-o", "-")
    assert code == 0, err
    assert len(out.encode()) == document["size"]

    missing = tmp_path / "no-such-folder" / "note.txt"
    code, _, err = await transmural(*fetch, "-o", str(missing))
    assert code == 2 and "does not exist" in err
    assert not missing.parent.exists()

    written = tmp_path / "note.txt"
    code, _, err = await transmural(*fetch, "-o", str(written))
    assert code == 0, err
    assert written.stat().st_size == document["size"]
    assert written.stat().st_mode & 0o077 == 0, "a fetched document is patient data: owner-only"
    assert not (tmp_path / "note.txt.part").exists()


async def test_bad_input_exit_2(network: NetworkFactory) -> None:
    net = await network(n=1)
    node = signed_in(net)
    for args, says in [
        (["search", "111222333", "--deadline-ms", "-5"], "0 to"),
        (["search", "|111222333"], "empty system"),
        (["search", "111222334"], "11-check"),
    ]:
        code, _, err = await transmural(*node, *args)
        assert code == 2, (args, err)
        assert says in err, (args, err)
        assert "Traceback" not in err


async def test_missing_token_or_ca_is_a_clear_error(network: NetworkFactory) -> None:
    net = await network(n=1)
    flags = signed_in(net)
    without_token = [f for i, f in enumerate(flags) if i not in (2, 3)]
    code, _, err = await transmural(*without_token, "search", "111222333")
    assert code == 2 and "no clinician token" in err
    code, _, err = await transmural(*flags[:4], "search", "111222333")
    assert code == 2 and "no network CA" in err
    code, _, err = await transmural(*flags[:6], "search", "111222333")
    assert code == 2 and "no node id" in err


async def test_gateway_refuses_a_client_trusting_another_ca(
    network: NetworkFactory, tmp_path: Path
) -> None:
    net = await network(n=1)
    _, foreign = pki.create_ca("Foreign")
    other_ca = tmp_path / "foreign-ca.crt"
    pki.write_certificate(other_ca, foreign)
    flags = signed_in(net)
    flags[5] = str(other_ca)
    code, _, err = await transmural(*flags, "search", "111222333")
    assert code == 3, err
    assert "is not your node: its certificate is not from your network's CA" in err
    assert "names another node" not in err and "node-1" not in err
    assert "running" not in err

    flags = signed_in(net)
    flags[7] = "node-9"
    code, _, err = await transmural(*flags, "report", "111222333")
    assert code == 3, err
    assert "is not your node: its certificate names another node, not node-9" in err
    assert "CA" not in err


# --- a node that connects, then freezes (a real TLS gRPC server of the test's own) ---

NODE_ID = "node-1"


@dataclass
class FakeNode:
    """A gateway at ``address`` with a certificate for node-1 from its own CA."""

    address: str
    ca_pem: bytes
    ca_file: Path

    def access(self, token: str = "tmu1_test") -> NodeAccess:
        return NodeAccess(self.address, token, self.ca_pem, NODE_ID)

    def flags(self, node_id: str = NODE_ID, token: str = "tmu1_test") -> list[str]:
        return ["--node", self.address, "--ca", str(self.ca_file), "--node-id", node_id,
                "--token", token]  # fmt: skip


@asynccontextmanager
async def frozen_node(tmp_path: Path) -> AsyncIterator[FakeNode]:
    """Search and Report send nothing, ever; FetchDocument sends one chunk, then nothing."""
    released = asyncio.Event()

    async def hang(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        await released.wait()
        yield b""

    async def one_chunk(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        chunk = common_pb2.DocumentChunk(data=b"first part")
        chunk.metadata.document_id, chunk.metadata.size = "d1", 1000
        yield chunk.SerializeToString()
        await released.wait()

    ca_key, ca_cert = pki.create_ca("Frozen")
    key = pki.new_private_key()
    cert = pki.issue_node_certificate(
        ca_key, ca_cert, pki.make_csr(key, NODE_ID), NODE_ID, "URA-1", "Frozen hospital"
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "transmural.v1.Gateway", {
            "Search": grpc.unary_stream_rpc_method_handler(hang),
            "Report": grpc.unary_stream_rpc_method_handler(hang),
            "FetchDocument": grpc.unary_stream_rpc_method_handler(one_chunk),
        },
    )])  # fmt: skip
    tls = transport.TlsFiles(pki.pem(ca_cert), pki.pem(cert), pki.key_pem(key))
    address = transport.bind(server, "127.0.0.1:0", tls, client_certificates=False)
    await server.start()
    ca_file = tmp_path / "frozen-ca.crt"
    pki.write_certificate(ca_file, ca_cert)
    try:
        yield FakeNode(address, pki.pem(ca_cert), ca_file)
    finally:
        released.set()
        await server.stop(0)


async def test_a_node_freezing_mid_fetch_is_given_up_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Connected, one chunk, then silence: the fetch ends (exit 3) after FETCH_IDLE_S
    without a chunk, rather than never."""
    monkeypatch.setattr(gateway_client, "FETCH_IDLE_S", 1.0)
    async with frozen_node(tmp_path) as node:
        client = GatewayClient(node.access())
        out = io.BytesIO()
        try:
            async with asyncio.timeout(10):  # without the idle limit: forever
                with pytest.raises(ClientError) as caught:
                    await client.fetch("999940375", "node-2", "d1", out)
        finally:
            await client.close()
    assert caught.value.exit_code == 3
    assert str(caught.value).startswith(
        f"your node at {node.address} stopped answering (nothing for 1 s)"
    )
    assert out.getvalue() == b"first part"


def test_the_fetch_idle_limit_covers_what_the_node_bounds() -> None:
    from node import const as node_const

    assert gateway_client.FETCH_IDLE_S == (
        node_const.MAX_PEER_DEADLINE_S + node_const.REGISTRY_DEADLINE_S + 5
    )


def test_a_search_waits_for_its_own_deadline_not_a_fixed_45_s() -> None:
    assert search_timeout_s(2000) == 2 + 3 + 5
    assert search_timeout_s(0) == 30 + 3 + 5  # the node's default may be up to its maximum


@pytest.mark.parametrize("command", ["search", "report"])
async def test_a_node_freezing_mid_search_is_given_up_on_after_the_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    """The timeout follows --deadline-ms (plus the registry's and a margin, shrunk here),
    and the message says how long the client waited."""
    monkeypatch.setattr(gateway_client, "REGISTRY_DEADLINE_S", 0.2)
    monkeypatch.setattr(gateway_client, "NODE_MARGIN_S", 0.3)
    async with frozen_node(tmp_path) as node:
        client = GatewayClient(node.access())
        events = getattr(client, command)("999940375", deadline_ms=500)
        started = asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(10):  # without the fix: 45 s
                with pytest.raises(ClientError) as caught:
                    async for _ in events:
                        pass
        finally:
            await client.close()
        elapsed = asyncio.get_running_loop().time() - started
    assert caught.value.exit_code == 3
    assert (
        f"your node at {node.address} stopped answering: the {command} did not end "
        "within 1 s" in str(caught.value)
    )
    assert 0.9 < elapsed < 5


async def test_an_oversized_request_is_bad_input_in_words_not_grpc_internals(
    tmp_path: Path,
) -> None:
    """A 16 kB token (grpc would refuse the header, exit 1 quoting its internals) is
    refused before any call; a request grpc itself finds too large is exit 2, in words."""
    async with frozen_node(tmp_path) as node:
        code, _, err = await transmural(*node.flags(token="t" * 16_000), "search", "999940375")
        assert code == 2, err
        assert err == (
            "transmural: the token is too long to be a clinician token (16000 characters; one "
            "from `transmural-admin user add` has 48): is it the right value, copied once?\n"
        )
        client = GatewayClient(node.access())
        try:
            with pytest.raises(ClientError) as caught:
                async for _ in client.search("9" * (5 * 1024 * 1024)):  # past grpc's 4 MB
                    pass
        finally:
            await client.close()
    assert caught.value.exit_code == 2
    assert str(caught.value).startswith("the request is too large")


async def test_control_characters_in_what_the_user_typed_are_escaped(tmp_path: Path) -> None:
    """An error quoting the node id (here: the certificate names another node) shows
    ESC as text, never a raw escape the terminal would obey."""
    async with frozen_node(tmp_path) as node:
        code, _, err = await transmural(
            *node.flags(node_id="node-1\x1b[31m"), "search", "999940375"
        )
    assert code == 3, err
    assert "\x1b" not in err and "not node-1\\x1b[31m" in err, err
    assert err.startswith("transmural: ") and err.count("\n") == 1
