"""Faults survived: hostile bytes, oversized messages and inputs, a registry that is down.

Every test runs real servers on loopback (the ``network`` fixture) and talks
to them over their real ports; nothing of ours is mocked.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import random
import socket
import sqlite3
import ssl
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from node import const as node_const
from node import peer_health
from node.consent_desk import ConsentDesk
from node.gateway import REGISTRY_DOWN
from node.ingest import ingest_file
from node.server import NodeServer
from registry import operator
from registry.server import RegistryServer
from tests.conftest import (
    NetworkFactory,
    RunningNetwork,
    collect,
    join_node,
    node_tls,
    wait_for,
)
from tests.test_ingest import bundle_of, dutch_patient, note
from tests.test_search import at_least, bsn_of
from tests.test_share import held_fetch, store_large_document
from tools.gateway_client import ClientError
from transmural import pki, transport
from transmural.const import MAX_MESSAGE_BYTES
from transmural.identifiers import BSN_SYSTEM, canonical
from transmural.v1 import common_pb2, gateway_pb2

JUNK = [
    b"\x00" * 64,
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    os.urandom(4096),
    b"\x16\x03\x01\x02\x00" + os.urandom(512),  # a TLS record header, then noise
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + os.urandom(256),  # HTTP/2 preface, then noise
]

#: The gateway method the raw calls below use most.
SEARCH = "/transmural.v1.Gateway/Search"


def _ports(net: RunningNetwork) -> dict[str, tuple[str, transport.TlsFiles | None, str]]:
    """Every listening port: name -> (address, client TLS, server name)."""
    assert net.registry.network is not None and net.registry.join_address
    node = net.nodes[0]
    mutual = node_tls(node.config)
    anonymous = transport.TlsFiles(mutual.ca_pem) if mutual else None
    return {
        "registry": (net.registry.address, mutual, pki.REGISTRY_DNS_NAME),
        "registry-join": (net.registry.join_address, anonymous, pki.REGISTRY_DNS_NAME),
        "node-peer": (node.address, mutual, pki.node_dns_name(node.config.node_id)),
        "node-gateway": (node.gateway_address, anonymous, pki.node_dns_name(node.config.node_id)),
    }


def _send_junk(address: str, payload: bytes) -> None:
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(5)
            while sock.recv(4096):
                pass  # the server answers something or drops us: either is fine
        except (ConnectionResetError, BrokenPipeError, TimeoutError):
            pass


def _send_junk_over_tls(address: str, ca_pem: bytes, server_name: str, payload: bytes) -> None:
    """A completed TLS handshake (no client certificate), then non-HTTP/2 bytes."""
    host, _, port = address.rpartition(":")
    context = ssl.create_default_context(cadata=ca_pem.decode())
    context.set_alpn_protocols(["h2"])
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        try:
            with context.wrap_socket(raw, server_hostname=server_name) as sock:
                sock.sendall(payload)
                sock.settimeout(5)
                while sock.recv(4096):
                    pass
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError, TimeoutError, OSError):
            pass  # refused (no client certificate) or dropped: both fine


async def _healthy(address: str, tls: transport.TlsFiles | None, server_name: str) -> None:
    channel = transport.open_channel(address, tls, server_name)
    try:
        await transport.health_check(channel, timeout_s=5.0)
    finally:
        await channel.close()


async def test_garbage_bytes_on_every_port_leave_the_servers_up(network: NetworkFactory) -> None:
    net = await network(n=1)
    for name, (address, tls, server_name) in _ports(net).items():
        for payload in JUNK:
            await asyncio.to_thread(_send_junk, address, payload)
            assert tls is not None
            await asyncio.to_thread(_send_junk_over_tls, address, tls.ca_pem, server_name, payload)
        try:
            await _healthy(address, tls, server_name)
        except grpc.aio.AioRpcError as error:
            # The join port serves Enrolment only: any gRPC answer proves it is up.
            assert name == "registry-join" and error.code() is grpc.StatusCode.UNIMPLEMENTED, (
                name,
                error,
            )
    # And the network still works end to end.
    holders, _ = await collect(net.client(0), "111222333")
    assert holders.node_ids == []


def _gateway_channel(net: RunningNetwork) -> grpc.aio.Channel:
    node = net.nodes[0]
    assert net.ca_pem is not None
    return transport.open_channel(
        node.gateway_address,
        transport.TlsFiles(net.ca_pem),
        pki.node_dns_name(node.config.node_id),
    )


async def _raw_call(
    net: RunningNetwork, method: str, payload: bytes, token: str | None = None
) -> grpc.aio.AioRpcError:
    """Send ``payload`` as the request of gateway ``method``; return the error it gets."""
    channel = _gateway_channel(net)
    try:
        call = channel.unary_stream(method, request_serializer=None, response_deserializer=None)
        metadata = (("authorization", f"Bearer {token or net.tokens[0]}"),)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in call(payload, timeout=10, metadata=metadata):
                pass
        return caught.value
    finally:
        await channel.close()


MALFORMED_MESSAGES = {
    "truncated varint": b"\x08\xff\xff",
    "length past the end": b"\x0a\x7fabc",
    "wire type 7": b"\x0f\x01",
    "random": bytes(range(256)) * 4,
}


@pytest.mark.parametrize("name", sorted(MALFORMED_MESSAGES))
@pytest.mark.parametrize(
    "method", [SEARCH, "/transmural.v1.Gateway/Report", "/transmural.v1.Gateway/FetchDocument"]
)
async def test_unparsable_message_is_invalid_argument_without_detail(
    network: NetworkFactory, method: str, name: str
) -> None:
    net = await network(n=1)
    error = await _raw_call(net, method, MALFORMED_MESSAGES[name])
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error
    details = error.details() or ""
    assert "Traceback" not in details and "Error" not in details and "File " not in details
    assert "could not be parsed" in details
    # The server stays up and answers a well-formed call.
    holders, _ = await collect(net.client(0), "111222333")
    assert holders.node_ids == []


async def test_unparsable_message_on_the_peer_port_is_invalid_argument(
    network: NetworkFactory,
) -> None:
    net = await network(n=2)
    node = net.nodes[1]
    channel = transport.open_channel(
        node.address, node_tls(net.nodes[0].config), pki.node_dns_name(node.config.node_id)
    )
    try:
        call = channel.unary_unary(
            "/transmural.v1.Peer/FindDocuments",
            request_serializer=None,
            response_deserializer=None,
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(MALFORMED_MESSAGES["truncated varint"], timeout=10)
    finally:
        await channel.close()
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "Traceback" not in (caught.value.details() or "")
    await _healthy(node.address, node_tls(node.config), pki.node_dns_name(node.config.node_id))


async def test_request_over_the_message_limit_is_resource_exhausted(
    network: NetworkFactory,
) -> None:
    net = await network(n=1)
    request = gateway_pb2.SearchRequest(
        patient=common_pb2.PatientIdentifier(system=BSN_SYSTEM, value="1" * (10 * 1024 * 1024)),
        purpose_of_use="treatment",
    )
    assert request.ByteSize() > MAX_MESSAGE_BYTES
    error = await _raw_call(net, SEARCH, request.SerializeToString())
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    # Still up, on the same port.
    holders, _ = await collect(net.client(0), "111222333")
    assert holders.node_ids == []


async def test_document_larger_than_the_message_limit_streams_intact(
    network: NetworkFactory, tmp_path: Path
) -> None:
    net = await network(n=2)
    content = os.urandom(6 * 1024 * 1024)
    assert len(content) > MAX_MESSAGE_BYTES
    bundle = tmp_path / "large.json"
    bundle.write_text(
        json.dumps(
            bundle_of(
                dutch_patient("big", "111222333"),
                note("scan", "big", base64.b64encode(content).decode()),
            )
        )
    )
    holder = net.nodes[1]
    await ingest_file(holder.store, bundle, net.pseudonymiser, BSN_SYSTEM)
    await net.consent_all(True)

    _, results = await collect(net.client(0), "111222333")
    listed = next(d for d in results["node-2"].documents if d.size == len(content))
    out = io.BytesIO()
    meta = await net.client(0).fetch("111222333", "node-2", listed.document_id, out)

    assert meta.sha256 == hashlib.sha256(content).hexdigest()
    assert hashlib.sha256(out.getvalue()).digest() == hashlib.sha256(content).digest()


async def test_a_clinician_who_goes_away_mid_fetch_frees_the_facility_at_once(
    network: NetworkFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Abandoned fetches must not keep the facility streaming to no one (until its deadline),
    holding its call slots and the asking node's memory."""
    monkeypatch.setattr(transport, "MAX_CONCURRENT_RPCS", 4)  # each server: 4 calls at once
    net = await network(n=2)
    size = 24 * 1024 * 1024  # far more than the flow-control windows hold
    _, document_id = await store_large_document(net, 1, tmp_path, size)
    client = net.client(0)
    for _ in range(6):  # more fetches than the facility has slots
        call = held_fetch(client, "111222333", "node-2", document_id)
        assert (await call.read()).data  # the first piece arrived, then the clinician
        await asyncio.sleep(0.3)  # stopped reading (the gateway waits to send) ...
        call.cancel()  # ... and went away

    async def facility_answers() -> bool:
        _, answers = await collect(net.client(0), "111222333")
        return answers["node-2"].status == "ok"

    await wait_for(facility_answers, within_s=10)
    out = io.BytesIO()
    await client.fetch("111222333", "node-2", document_id, out)
    assert len(out.getvalue()) == size


SQL_LIKE = ["1' OR '1'='1", "111222333'; DROP TABLE patients; --", '"); DELETE FROM documents; --']


async def _stored(net: RunningNetwork) -> tuple[Any, ...]:
    store = net.nodes[0].store
    return (
        await store.resource_count(),
        await store.document_count(),
        len(await store.patients()),
        len(await store.all_consents()),
    )


@pytest.mark.parametrize("value", SQL_LIKE)
async def test_identifier_with_sql_metacharacters_is_refused(
    network: NetworkFactory, tmp_path: Path, value: str
) -> None:
    net = await network(n=1)
    bundle = tmp_path / "one.json"
    bundle.write_text(json.dumps(bundle_of(dutch_patient("p1", "111222333"), note("n1", "p1"))))
    await ingest_file(net.nodes[0].store, bundle, net.pseudonymiser, BSN_SYSTEM)
    before = await _stored(net)
    # A bare value goes to the node unchecked: the node refuses it as a BSN.
    with pytest.raises(ClientError) as caught:
        await collect(net.client(0), value)
    assert caught.value.exit_code == 2, caught.value
    assert "BSN" in str(caught.value) and "internal" not in str(caught.value).lower()
    # The same value under a system of its own is a valid (opaque) identifier:
    # it is pseudonymised, never spliced into SQL, and nobody holds it.
    holders, results = await collect(net.client(0), f"urn:x' OR 1=1 --|{value}")
    assert holders.node_ids == [] and results == {}
    assert await _stored(net) == before
    # The patient is still found by the right identifier.
    assert await net.nodes[0].store.patient_by_identifier(canonical(BSN_SYSTEM, "111222333"))


async def test_large_identifier_under_the_limit_is_a_clear_error(network: NetworkFactory) -> None:
    net = await network(n=1)
    with pytest.raises(ClientError) as caught:
        await collect(net.client(0), "1" * (2 * 1024 * 1024))
    assert caught.value.exit_code == 2
    assert len(str(caught.value)) < 1000  # the identifier is not echoed back


async def _stop_registry(net: RunningNetwork) -> str:
    """Stop the registry; returns the address it listened on."""
    address = net.registry.address
    await net.registry.stop(0)
    return address


async def _restart_registry(net: RunningNetwork, address: str) -> None:
    """Start the registry again on the same address and database."""
    registry = RegistryServer(
        net.root / "registry.db",
        listen=address,
        join_listen="127.0.0.1:0",
        network_dir=net.root / "network",
    )
    await registry.start()
    net.registry = registry


async def test_registry_down_search_answers_from_known_holders_marked_incomplete(
    network: NetworkFactory, synthetic_bundles: Path
) -> None:
    net = await network(n=2)
    plan = await net.load(synthetic_bundles)
    await net.consent_all(True)
    known, unseen = (bsn_of(plan, f) for f in at_least(plan, 2)[:2])
    found, before = await collect(net.client(0), known)
    assert all(r.status == "ok" and REGISTRY_DOWN not in r.message for r in before.values())
    assert found.incomplete == ""

    address = await _stop_registry(net)

    holders, during = await collect(net.client(0), known)
    assert set(holders.node_ids) == set(before)
    assert holders.incomplete.startswith(REGISTRY_DOWN)  # said once, for programs too
    for node_id, result in during.items():
        assert result.status == "ok", result
        assert REGISTRY_DOWN in result.message
        assert {d.document_id for d in result.documents} == {
            d.document_id for d in before[node_id].documents
        }
    # Never located before: a clear error, not "no records".
    with pytest.raises(ClientError, match="registry") as caught:
        await collect(net.client(0), unseen)
    assert caught.value.exit_code != 0

    await _restart_registry(net, address)

    async def unmarked() -> bool:
        try:
            _, results = await collect(net.client(0), known)
        except ClientError:
            return False
        return all(REGISTRY_DOWN not in r.message for r in results.values())

    await wait_for(unmarked, within_s=20)


async def test_registry_down_a_node_revoked_since_is_not_asked_from_memory(
    network: NetworkFactory, synthetic_bundles: Path
) -> None:
    """Remembered holders stand in for the registry, never for a revocation made since."""
    net = await network(n=3)
    plan = await net.load(synthetic_bundles)
    await net.consent_all(True)
    bsn = bsn_of(plan, at_least(plan, 2)[0])
    _, before = await collect(net.client(0), bsn)
    revoked = next(n for n in net.nodes[1:] if n.config.node_id in before)
    assert net.registry.membership is not None
    await net.registry.membership.revoke(revoked.config.organisation_id)
    await net.nodes[0].revocations.refresh()  # node-1 learns it (as its poller would)

    await _stop_registry(net)

    try:
        _, during = await collect(net.client(0), bsn)
    except ClientError as nobody_left:  # the revoked node was the only other holder
        assert nobody_left.exit_code == 5
    else:
        assert revoked.config.node_id not in during
        assert set(during) == set(before) - {revoked.config.node_id}


async def test_registry_down_leaves_a_refusal_in_its_own_words(
    network: NetworkFactory, synthetic_bundles: Path
) -> None:
    net = await network(n=3)
    plan = await net.load(synthetic_bundles)
    await net.consent_all(True)
    fhir_id = at_least(plan, 2)[0]
    bsn = bsn_of(plan, fhir_id)
    refusing = plan.patients[fhir_id].nodes[-1]
    await net.deny_organisation(refusing, bsn, net.nodes[0].config.organisation_id)
    await collect(net.client(0), bsn)  # the gateway now remembers the holders
    address = await _stop_registry(net)

    holders, results = await collect(net.client(0), bsn)
    assert holders.incomplete.startswith(REGISTRY_DOWN)
    denied = results.pop(net.nodes[refusing].config.node_id)
    assert denied.status == "consent-denied" and REGISTRY_DOWN not in denied.message
    assert results and all(REGISTRY_DOWN in r.message for r in results.values())
    await _restart_registry(net, address)


async def test_a_revoked_node_is_told_the_network_cannot_answer_it(
    network: NetworkFactory, synthetic_bundles: Path
) -> None:
    net = await network(n=2)
    plan = await net.load(synthetic_bundles)
    await net.consent_all(True)
    bsn = bsn_of(plan, at_least(plan, 2)[0])
    _, before = await collect(net.client(1), bsn)
    assert "node-1" in before  # node-2 remembers node-1: no way round its own revocation
    await operator.revoke(net.root / "registry.db", net.nodes[1].config.organisation_id)

    async def refused() -> bool:
        try:
            await collect(net.client(1), bsn)
        except ClientError as error:
            assert error.exit_code == 5, error  # not 1, "no facility knows the patient"
            return "revoked" in str(error)
        return False

    await wait_for(refused)


async def _start_hung_registry(net: RunningNetwork, address: str) -> grpc.aio.Server:
    """A registry at ``address`` (real certificate from the network CA) that never answers."""
    never = asyncio.Event()

    async def hang(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await never.wait()
        return b""

    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "transmural.v1.Registry", {"Locate": grpc.unary_unary_rpc_method_handler(hang)},
    )])  # fmt: skip
    network = net.registry.network
    assert network is not None
    key = pki.new_private_key()
    cert = pki.issue_registry_certificate(network.ca_key, network.ca_cert, key)
    tls = transport.TlsFiles(pki.pem(network.ca_cert), pki.pem(cert), pki.key_pem(key))
    transport.bind(server, address, tls, client_certificates=False)
    await server.start()
    return server


async def test_a_hung_registry_costs_one_search_its_deadline_not_every_search(
    network: NetworkFactory, synthetic_bundles: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(node_const, "REGISTRY_DEADLINE_S", 2.0)
    monkeypatch.setattr(peer_health, "FIRST_BACKOFF_S", 0.5)
    net = await network(n=2)
    plan = await net.load(synthetic_bundles)
    await net.consent_all(True)
    known = bsn_of(plan, at_least(plan, 1)[0])
    _, before = await collect(net.client(0), known)  # the gateway now remembers its holders
    address = await _stop_registry(net)
    hung = await _start_hung_registry(net, address)
    try:
        timings = []
        for _ in range(2):
            started = time.monotonic()
            holders, results = await collect(net.client(0), known)
            timings.append(time.monotonic() - started)
            assert holders.incomplete.startswith(REGISTRY_DOWN)
            assert set(results) == set(before) and all(r.status == "ok" for r in results.values())
        assert timings[0] >= 2.0  # the first search waited for the registry ...
        assert timings[1] < 1.0  # ... the next did not: the registry backs off
        await asyncio.sleep(0.6)  # the window ends: the next search is the probe ...
        started = time.monotonic()
        holders, results = await collect(net.client(0), known)
        # ... and its clinician waits a moment for it, not the registry's deadline.
        assert time.monotonic() - started < 1.5
        assert holders.incomplete.startswith(REGISTRY_DOWN)
        assert set(results) == set(before)
    finally:
        await hung.stop(0)
    await _restart_registry(net, address)

    async def complete() -> bool:
        holders, _ = await collect(net.client(0), known)
        return holders.incomplete == ""

    await wait_for(complete, within_s=20)  # a probe after the window finds it back


def _registry_rows(database: Path) -> list[tuple[bytes, str]]:
    with sqlite3.connect(database) as conn:
        return conn.execute("SELECT pseudonym, node_id FROM index_entries").fetchall()


async def test_publishes_while_the_registry_is_down_arrive_once_it_is_back(
    network: NetworkFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(node_const, "PUBLISH_RETRY_MAX_S", 0.3)
    net = await network(n=1)
    node = net.nodes[0]
    first = tmp_path / "first.json"
    first.write_text(json.dumps(bundle_of(dutch_patient("p1", "111222333"), note("n1", "p1"))))
    await ingest_file(node.store, first, net.pseudonymiser, BSN_SYSTEM)
    await net.consent_all(True)
    rows_before = _registry_rows(net.root / "registry.db")

    address = await _stop_registry(net)
    desk = ConsentDesk(node.store)
    bsns = ["012345672", "123456782", "234567892"]
    for i, bsn in enumerate(bsns):
        bundle = tmp_path / f"down-{i}.json"
        bundle.write_text(
            json.dumps(bundle_of(dutch_patient(f"d{i}", bsn), note(f"m{i}", f"d{i}")))
        )
        await ingest_file(node.store, bundle, net.pseudonymiser, BSN_SYSTEM)
        patient = await node.store.patient_by_identifier(canonical(BSN_SYSTEM, bsn))
        assert patient is not None
        await desk.record([desk.blanket(patient.patient_key, True, "test desk")])
    node.publisher.wake()
    await asyncio.sleep(0.5)  # the publisher tries, fails and keeps its outbox
    assert await node.store.pending_index_count() > 0

    await _restart_registry(net, address)

    async def drained() -> bool:
        return await node.store.pending_index_count() == 0

    await wait_for(drained, within_s=20)
    rows = _registry_rows(net.root / "registry.db")
    assert len(rows) == len(set(rows)), "an entry was published twice"
    expected = {net.pseudonymiser.pseudonym(canonical(BSN_SYSTEM, b)) for b in bsns}
    assert expected <= {p for p, n in rows if n == "node-1"}
    assert len(rows) == len(rows_before) + len(bsns)


async def test_a_burst_beyond_the_limit_is_refused_not_queued() -> None:
    """Overload: calls past the server's limit get RESOURCE_EXHAUSTED at once."""
    never = asyncio.Event()

    async def hang(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await never.wait()
        return b""

    server = transport.new_server(max_concurrent_rpcs=2)
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(
            "test.Slow", {"Call": grpc.unary_unary_rpc_method_handler(hang)}
        )]
    )  # fmt: skip
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        call = channel.unary_unary("/test.Slow/Call")
        calls = [asyncio.ensure_future(call(b"", timeout=3)) for _ in range(6)]
        done, _ = await asyncio.wait(calls, timeout=2.5)
        codes = [getattr(c.exception(), "code", lambda: None)() for c in done]
        refused = [code for code in codes if code is grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert len(refused) == 4, [c.exception() for c in done]
        # The clinician's client tells "node busy" by this detail (tools.gateway_client).
        details = [c.exception().details() for c in done if c.exception() is not None]
        assert sum("concurrent" in (d or "").lower() for d in details) == 4, details
    finally:
        for c in calls:
            c.cancel()
        await channel.close()
        await server.stop(0)


#: How long a server may take to drop a connection that sent it garbage.
DROP_WITHIN_S = 5.0
_NOISE = random.Random(6).randbytes(4096)
#: Garbage that must get the connection dropped. Fixed bytes, unlike JUNK: random
#: ones could now and then make a well-formed but unfinished record (a TLS or
#: HTTP/2 frame header promising more bytes), which a server rightly waits for.
GARBAGE = {
    "zeros": b"\x00" * 64,
    "http/1.1": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "noise": _NOISE,
    "tls header, then noise": b"\x16\x03\x01\x02\x00" + _NOISE[:512],
    "http/2 preface, then noise": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _NOISE[:256],
}


def _member_tls_context(node: NodeServer) -> ssl.SSLContext:
    """TLS as a member node speaks it (its certificate, ALPN h2): the handshake
    completes on every port, so the garbage reaches grpc's HTTP/2 layer."""
    config = node.config
    assert config.ca_certificate and config.certificate and config.private_key
    context = ssl.create_default_context(cafile=str(config.ca_certificate))
    context.load_cert_chain(config.certificate, config.private_key)
    context.set_alpn_protocols(["h2"])
    return context


def _until_dropped(sock: socket.socket) -> str:
    """Read, never writing again, until the server closes: "eof" or "reset", or "open"."""
    deadline = time.monotonic() + DROP_WITHIN_S
    try:
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if not sock.recv(4096):
                return "eof"
    except TimeoutError:
        return "open"
    except (ConnectionResetError, ssl.SSLError):  # a TLS alert, then the close
        return "reset"
    return "open"


def _garbage_ending(
    address: str, payload: bytes, context: ssl.SSLContext | None, server_name: str
) -> str:
    """Send ``payload`` (after a TLS handshake with ``context``) with the write side
    left open, so only the server can end the connection; how it ended."""
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=DROP_WITHIN_S) as raw:
        sock = raw if context is None else context.wrap_socket(raw, server_hostname=server_name)
        try:
            sock.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            return "reset"  # dropped before it had read everything
        return _until_dropped(sock)


@pytest.mark.parametrize("port", ["registry", "registry-join", "node-peer", "node-gateway"])
async def test_garbage_gets_the_connection_dropped_and_the_server_answers_after(
    network: NetworkFactory, tmp_path: Path, port: str
) -> None:
    net = await network(n=1)
    address, tls, server_name = _ports(net)[port]
    context = _member_tls_context(net.nodes[0])
    for layer, over in (("tcp", None), ("tls", context)):
        for name, payload in GARBAGE.items():
            ended = await asyncio.to_thread(_garbage_ending, address, payload, over, server_name)
            assert ended in ("eof", "reset"), (
                f"{port}: {name} over {layer} left the connection {ended} after {DROP_WITHIN_S:g} s"
            )
    # The server still answers a real call on the same port.
    if port == "registry-join":
        joined = await join_node(net.registry, tmp_path / "late", 7)
        assert joined.certificate is not None and joined.certificate.exists()
    else:
        await _healthy(address, tls, server_name)
    holders, _ = await collect(net.client(0), "111222333")
    assert holders.node_ids == []


def _open_idle(address: str, count: int) -> list[socket.socket]:
    host, port = address.rsplit(":", 1)
    return [socket.create_connection((host, int(port)), timeout=5) for _ in range(count)]


def _closed_by_server(sockets: list[socket.socket], within_s: float) -> int:
    """How many of ``sockets`` the server closes (EOF or reset) within ``within_s``."""
    closed = 0
    deadline = time.monotonic() + within_s
    for sock in sockets:
        try:
            while True:  # the server may send its HTTP/2 settings first
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                if sock.recv(4096) == b"":
                    closed += 1
                    break
        except ConnectionResetError:
            closed += 1
        except TimeoutError:
            pass
    return closed


async def test_idle_connections_are_capped_and_dropped_after_the_handshake_timeout() -> None:
    """Sockets opened and left silent cost memory: beyond the cap they are closed
    at once, and the rest when the handshake timeout passes; the server answers after."""
    server = transport.new_server(max_connections=4, handshake_timeout_ms=1_000)
    health_servicer = transport.add_health_and_reflection(server, [])
    address = transport.bind(server, "127.0.0.1:0", None)
    await server.start()
    await transport.mark_serving(health_servicer, [])
    idle: list[socket.socket] = []
    try:
        idle = await asyncio.to_thread(_open_idle, address, 10)
        assert await asyncio.to_thread(_closed_by_server, idle[4:], 0.5) == 6  # over the cap
        assert await asyncio.to_thread(_closed_by_server, idle[:4], 3.0) == 4  # handshake timeout
        channel = transport.open_channel(address, None)
        try:
            await transport.health_check(channel, 5)
        finally:
            await channel.close()
    finally:
        for sock in idle:
            sock.close()
        await server.stop(0)
