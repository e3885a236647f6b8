"""Trust at a node's ports (flows 4 and 5): real mutual TLS on loopback, no mocks.

The registry's side is in test_enrolment.py. Here a test plays node-2: it
dials node-1's peer port with node-2's certificate and signs requester
assertions with node-2's key, exactly as node-2's PeerChannels would, and
changes one thing at a time to see node-1 refuse it and say why.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from node import const
from node.server import NodeServer
from registry.network import NetworkFiles, init_network
from tests.conftest import CLINICIAN_ID, NetworkFactory, RunningNetwork, collect, node_tls, wait_for
from tests.test_search import bsn_of
from transmural import assertion, pki, transport
from transmural.assertion import RequesterAssertion
from transmural.identifiers import BSN_SYSTEM, canonical
from transmural.status import from_server
from transmural.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, peer_pb2, peer_pb2_grpc

# --- node-2, as a test plays it ---


@dataclasses.dataclass(frozen=True)
class Member:
    """A node's certificate, key and identity: what a peer call is made with."""

    node_id: str
    organisation_id: str
    tls: transport.TlsFiles
    key: pki.PrivateKey


def member(node: NodeServer) -> Member:
    """A joined node of the network, as it dials its peers."""
    config = node.config
    tls = node_tls(config)
    assert tls is not None and config.private_key is not None
    return Member(
        config.node_id, config.organisation_id, tls, pki.read_private_key(config.private_key)
    )


def mint(
    network: NetworkFiles, node_id: str, *, now: datetime | None = None, days: int = pki.NODE_DAYS
) -> Member:
    """A node certificate signed by ``network``'s CA directly (no invite, no registry)."""
    key = pki.new_private_key()
    organisation_id = f"URA-{node_id}"
    cert = pki.issue_node_certificate(
        network.ca_key, network.ca_cert, pki.make_csr(key, node_id), node_id,
        organisation_id, f"Facility {node_id}", now=now, days=days,
    )  # fmt: skip
    tls = transport.TlsFiles(pki.pem(network.ca_cert), pki.pem(cert), pki.key_pem(key))
    return Member(node_id, organisation_id, tls, key)


def network_of(net: RunningNetwork) -> NetworkFiles:
    assert net.registry.network is not None
    return net.registry.network


def claim(
    caller: Member, pseudonym: bytes, audience: str = "node-1", now: float | None = None
) -> RequesterAssertion:
    """What node-2's AssertionSigner would state for one of its clinicians."""
    return assertion.new_assertion(
        issuer=caller.node_id,
        organisation_id=caller.organisation_id,
        clinician_id=CLINICIAN_ID,
        display_name="Dr. Test",
        role="physician",
        purpose_of_use="treatment",
        pseudonym=pseudonym,
        audience=audience,
        now=time.time() if now is None else now,
        lifetime_s=const.ASSERTION_LIFETIME_S,
    )


def signed(statement: RequesterAssertion, key: pki.PrivateKey) -> common_pb2.SignedAssertion:
    payload, signature = assertion.sign(statement, key)
    return common_pb2.SignedAssertion(payload=payload, signature=signature)


def find(
    pseudonym: bytes, signed_assertion: common_pb2.SignedAssertion | None = None
) -> peer_pb2.FindDocumentsRequest:
    return peer_pb2.FindDocumentsRequest(
        pseudonym=pseudonym, correlation_id="test", assertion=signed_assertion
    )


@asynccontextmanager
async def peer(
    address: str, tls: transport.TlsFiles, node_id: str = "node-1"
) -> AsyncIterator[peer_pb2_grpc.PeerStub]:
    """A Peer stub on the channel PeerChannels opens: ``node_id``'s name checked by TLS."""
    channel = transport.open_channel(address, tls, pki.node_dns_name(node_id))
    try:
        yield peer_pb2_grpc.PeerStub(channel)
    finally:
        await channel.close()


async def refusal(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value


@dataclasses.dataclass
class Scene:
    """Two joined nodes; node-1 holds ``pseudonym``'s documents and may share them."""

    net: RunningNetwork
    node_2: Member
    pseudonym: bytes
    documents: int


@pytest.fixture
async def scene(network: NetworkFactory, synthetic_bundles: Path) -> Scene:
    net = await network(n=2)
    await net.load(synthetic_bundles)
    await net.consent_all(True)
    store = net.nodes[0].store
    for patient in await store.patients():
        documents = await store.documents_of(patient.patient_key)
        if patient.pseudonym is not None and documents:
            return Scene(net, member(net.nodes[1]), patient.pseudonym, len(documents))
    raise AssertionError("node-1 holds no patient with documents")


# --- 1. the peer port's TLS: who may connect at all ---


async def assert_handshake_refused(scene: Scene, caller: Member) -> None:
    """``caller``'s well-formed, correctly signed call never reaches node-1's servicer."""
    request = find(scene.pseudonym, signed(claim(caller, scene.pseudonym), caller.key))
    async with peer(scene.net.nodes[0].address, caller.tls) as stub:
        error = await refusal(stub.FindDocuments(request, timeout=5))
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error
    assert not from_server(error), "the TLS handshake must fail, not the call"


async def test_a_member_certificate_is_answered(scene: Scene) -> None:
    """The control for every refusal below: node-2's own certificate and assertion pass."""
    request = find(scene.pseudonym, signed(claim(scene.node_2, scene.pseudonym), scene.node_2.key))
    async with peer(scene.net.nodes[0].address, scene.node_2.tls) as stub:
        reply = await stub.FindDocuments(request, timeout=5)
    assert reply.status == common_pb2.FACILITY_STATUS_OK
    assert len(reply.documents) == scene.documents


async def test_a_client_without_a_certificate_is_refused(scene: Scene) -> None:
    anonymous = dataclasses.replace(scene.node_2, tls=transport.TlsFiles(scene.node_2.tls.ca_pem))
    await assert_handshake_refused(scene, anonymous)


async def test_a_certificate_from_a_foreign_ca_is_refused(scene: Scene, tmp_path: Path) -> None:
    foreign = mint(init_network(tmp_path / "foreign", "Foreign"), "node-2")
    # Named node-2 but signed by another network's CA; it trusts ours, to verify node-1.
    foreign = dataclasses.replace(
        foreign, tls=dataclasses.replace(foreign.tls, ca_pem=scene.node_2.tls.ca_pem)
    )
    await assert_handshake_refused(scene, foreign)


async def test_an_expired_certificate_from_the_network_ca_is_refused(scene: Scene) -> None:
    long_ago = datetime.now(UTC) - timedelta(days=30)
    expired = mint(network_of(scene.net), "node-9", now=long_ago, days=1)
    await assert_handshake_refused(scene, expired)
    # The same CA's certificate, still valid, is let in (and then judged by its assertion).
    valid = mint(network_of(scene.net), "node-9")
    request = find(scene.pseudonym, signed(claim(valid, scene.pseudonym), valid.key))
    async with peer(scene.net.nodes[0].address, valid.tls) as stub:
        reply = await stub.FindDocuments(request, timeout=5)
    assert reply.status == common_pb2.FACILITY_STATUS_OK


async def test_the_tls_name_check_binds_a_node_id_to_its_address(scene: Scene) -> None:
    """Dialling node-2's address while expecting node-1 fails: node-2 cannot pose as node-1."""
    node_2 = scene.net.nodes[1]
    as_node_1 = member(scene.net.nodes[0])
    request = find(
        scene.pseudonym, signed(claim(as_node_1, scene.pseudonym, "node-2"), as_node_1.key)
    )

    async with peer(node_2.address, as_node_1.tls, node_id="node-1") as stub:
        error = await refusal(stub.FindDocuments(request, timeout=5))
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error
    assert not from_server(error)

    # The same address under its own name is node-2 (which holds no record of the patient).
    async with peer(node_2.address, as_node_1.tls, node_id="node-2") as stub:
        reply = await stub.FindDocuments(request, timeout=5)
    assert reply.status in (common_pb2.FACILITY_STATUS_OK, common_pb2.FACILITY_STATUS_NO_RECORD)


# --- 2. requester assertions: each failure its own status and message ---


async def call_node_1(scene: Scene, request: peer_pb2.FindDocumentsRequest) -> grpc.aio.AioRpcError:
    """node-2's call to node-1, which must be refused by node-1's servicer."""
    async with peer(scene.net.nodes[0].address, scene.node_2.tls) as stub:
        error = await refusal(stub.FindDocuments(request, timeout=5))
    assert from_server(error), f"refused before node-1's servicer: {error}"
    return error


async def test_a_valid_assertion_is_answered_once_and_its_replay_refused(scene: Scene) -> None:
    request = find(scene.pseudonym, signed(claim(scene.node_2, scene.pseudonym), scene.node_2.key))
    async with peer(scene.net.nodes[0].address, scene.node_2.tls) as stub:
        reply = await stub.FindDocuments(request, timeout=5)
        replayed = await refusal(stub.FindDocuments(request, timeout=5))

    assert reply.status == common_pb2.FACILITY_STATUS_OK
    assert len(reply.documents) == scene.documents
    assert replayed.code() == grpc.StatusCode.ALREADY_EXISTS
    assert replayed.details() is not None
    assert replayed.details().startswith("assertion nonce ")
    assert replayed.details().endswith(" from node-2 was already used")


async def test_an_assertion_signed_with_another_key_is_unauthenticated(scene: Scene) -> None:
    statement = claim(scene.node_2, scene.pseudonym)
    error = await call_node_1(
        scene, find(scene.pseudonym, signed(statement, pki.new_private_key()))
    )
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error.details() == (
        "the assertion's signature does not verify with the caller's certificate key"
    )


async def test_an_assertion_for_another_node_is_refused(scene: Scene) -> None:
    statement = claim(scene.node_2, scene.pseudonym, audience="node-3")
    error = await call_node_1(scene, find(scene.pseudonym, signed(statement, scene.node_2.key)))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details() == "assertion is for node-3, not node-1"


async def test_an_expired_assertion_is_refused(scene: Scene) -> None:
    an_hour_ago = time.time() - 3600
    statement = claim(scene.node_2, scene.pseudonym, now=an_hour_ago)
    error = await call_node_1(scene, find(scene.pseudonym, signed(statement, scene.node_2.key)))
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE
    assert error.details() is not None
    assert error.details().startswith("assertion expired ")
    assert error.details().endswith(" s ago (allowed clock skew 30 s)")


async def test_an_assertion_issued_by_another_node_than_the_certificate_is_refused(
    scene: Scene,
) -> None:
    """node-2's certificate, node-2's key, but the assertion says node-3 asks."""
    statement = dataclasses.replace(claim(scene.node_2, scene.pseudonym), issuer="node-3")
    error = await call_node_1(scene, find(scene.pseudonym, signed(statement, scene.node_2.key)))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert (
        error.details() == "assertion was issued by node-3, but the caller's certificate is node-2"
    )


async def test_an_assertion_naming_another_organisation_is_refused(scene: Scene) -> None:
    statement = dataclasses.replace(
        claim(scene.node_2, scene.pseudonym), organisation_id="URA-90000003"
    )
    error = await call_node_1(scene, find(scene.pseudonym, signed(statement, scene.node_2.key)))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error.details() == (
        "assertion names organisation URA-90000003, "
        f"but the caller's certificate names {scene.node_2.organisation_id}"
    )


async def test_an_assertion_for_another_patient_is_refused(scene: Scene) -> None:
    other_patient = bytes(reversed(scene.pseudonym))
    statement = claim(scene.node_2, other_patient)
    error = await call_node_1(scene, find(scene.pseudonym, signed(statement, scene.node_2.key)))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error.details() == "the assertion was issued for another patient"


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"not json", "assertion payload is not JSON: "),
        (b"[]", "assertion payload is not a JSON object"),
        (b'{"issuer":"node-2"}', "assertion payload fields wrong: missing ["),
    ],
)
async def test_a_malformed_assertion_is_invalid(scene: Scene, payload: bytes, message: str) -> None:
    # Signed by node-2 itself: only the shape is wrong.
    signature = scene.node_2.key.sign(payload, ec.ECDSA(hashes.SHA256()))
    malformed = common_pb2.SignedAssertion(payload=payload, signature=signature)
    error = await call_node_1(scene, find(scene.pseudonym, malformed))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() is not None and error.details().startswith(message)


async def test_a_call_without_an_assertion_is_invalid(scene: Scene) -> None:
    error = await call_node_1(scene, find(scene.pseudonym))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "the call carries no requester assertion"


async def test_a_document_fetch_checks_the_assertion_too(scene: Scene) -> None:
    """FetchDocument is a server stream: the same checks, before any chunk is sent."""
    patient = await scene.net.nodes[0].store.patient_by_pseudonym(scene.pseudonym)
    assert patient is not None
    document = (await scene.net.nodes[0].store.documents_of(patient.patient_key))[0]
    statement = claim(scene.node_2, scene.pseudonym, audience="node-3")
    request = peer_pb2.FetchDocumentRequest(
        pseudonym=scene.pseudonym,
        document_id=document.document_id,
        correlation_id="test",
        assertion=signed(statement, scene.node_2.key),
    )
    async with peer(scene.net.nodes[0].address, scene.node_2.tls) as stub:
        call = stub.FetchDocument(request, timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in call:
                pytest.fail("a chunk was sent for a refused assertion")
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.details() == "assertion is for node-3, not node-1"


# --- 3. revocation: node-1 refuses a revoked node-2 on its peer port ---


def revoked_message(node_id: str) -> str:
    return f"the certificate of node {node_id} has been revoked"


async def assert_refuses_revoked(stub: peer_pb2_grpc.PeerStub, scene: Scene) -> None:
    request = find(scene.pseudonym, signed(claim(scene.node_2, scene.pseudonym), scene.node_2.key))
    error = await refusal(stub.FindDocuments(request, timeout=5))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error.details() == revoked_message("node-2")


async def test_a_revoked_node_is_refused_once_the_list_is_refreshed(scene: Scene) -> None:
    net = scene.net
    assert net.registry.membership is not None
    async with peer(net.nodes[0].address, scene.node_2.tls) as stub:
        request = find(
            scene.pseudonym, signed(claim(scene.node_2, scene.pseudonym), scene.node_2.key)
        )
        reply = await stub.FindDocuments(request, timeout=5)
        assert reply.status == common_pb2.FACILITY_STATUS_OK

        await net.registry.membership.revoke(scene.node_2.organisation_id)
        await net.nodes[0].revocations.refresh()

        # Refused on the connection it already had: the check is per call, not per handshake.
        await assert_refuses_revoked(stub, scene)
    async with peer(net.nodes[0].address, scene.node_2.tls) as stub:
        await assert_refuses_revoked(stub, scene)


async def test_a_revoked_node_is_refused_within_the_poll_interval(
    network: NetworkFactory, synthetic_bundles: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    poll_s = 0.3
    monkeypatch.setattr(const, "REVOCATION_POLL_S", poll_s)
    net = await network(n=3)
    plan = await net.load(synthetic_bundles)
    await net.consent_all(True)
    assert net.registry.membership is not None
    node_2 = member(net.nodes[1])
    # A patient node-2 holds together with at least one other facility.
    fhir_id = next(
        f for f in sorted(plan.patients)
        if 1 in plan.patients[f].nodes and len(plan.patients[f].nodes) >= 2
    )  # fmt: skip
    held_by = {f"node-{i + 1}" for i in plan.patients[fhir_id].nodes}
    bsn = bsn_of(plan, fhir_id)
    pseudonym = net.pseudonymiser.pseudonym(canonical(BSN_SYSTEM, bsn))
    scene = Scene(net, node_2, pseudonym, 0)

    async with peer(net.nodes[0].address, node_2.tls) as stub:
        request = find(pseudonym, signed(claim(node_2, pseudonym), node_2.key))
        await stub.FindDocuments(request, timeout=5)  # admitted before the revocation

        await net.registry.membership.revoke(node_2.organisation_id)
        started = time.monotonic()

        async def refused() -> bool:
            fresh = find(pseudonym, signed(claim(node_2, pseudonym), node_2.key))
            try:
                await stub.FindDocuments(fresh, timeout=5)
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error
                assert error.details() == revoked_message("node-2")
                return True
            return False

        await wait_for(refused, within_s=poll_s * 10)
        took = time.monotonic() - started
        await assert_refuses_revoked(stub, scene)
    assert took <= poll_s + 0.5, f"refused only after {took:.2f} s"

    # node-1's clinician still gets every other facility's answer.
    holders, results = await collect(net.client(0), bsn)
    assert "node-2" not in holders.node_ids, "a revoked node stays out of the registry's index"
    others = held_by - {"node-2"}
    assert set(results) == others
    assert all(results[n].status == "ok" for n in others), results


# --- 4. the gateway: clinicians of this node, for treatment or emergency ---


async def gateway_search(
    net: RunningNetwork, index: int, token: str, purpose: str = "treatment", reason: str = ""
) -> list[gateway_pb2.SearchEvent]:
    """A raw Search on node ``index``'s gateway, as the thin client sends it."""
    assert net.ca_pem is not None
    node = net.nodes[index]
    channel = transport.open_channel(
        node.gateway_address, transport.TlsFiles(net.ca_pem),
        pki.node_dns_name(node.config.node_id),
    )  # fmt: skip
    request = gateway_pb2.SearchRequest(
        patient=common_pb2.PatientIdentifier(value="111222333"),
        purpose_of_use=purpose,
        reason=reason,
    )
    try:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        call = stub.Search(request, timeout=5, metadata=(("authorization", f"Bearer {token}"),))
        return [event async for event in call]
    finally:
        await channel.close()


async def test_a_token_is_good_only_at_the_node_that_issued_it(network: NetworkFactory) -> None:
    net = await network(n=2)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway_search(net, 1, net.tokens[0])

    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert caught.value.details() == "this clinician token is not known at this node"
    # Each token works where it was issued.
    for index in (0, 1):
        events = await gateway_search(net, index, net.tokens[index])
        assert events and events[0].HasField("located")
    # The refused attempt is in node-2's audit log, with where it came from, never the token.
    async with net.nodes[1].store.database.read("test") as db:
        rows = await db.execute_fetchall(
            "SELECT outcome, outcome_reason, requesting_address, clinician_id FROM audit_log"
            " WHERE action = 'sign-in'"
        )
    assert [tuple(r[:2]) for r in rows] == [("denied", "the token is not known at this node")]
    assert "127.0.0.1" in rows[0][2] and net.tokens[0] not in str(tuple(rows[0]))


@pytest.mark.parametrize("purpose", ["research", "billing", "TREATMENT", "treatment "])
async def test_a_purpose_other_than_treatment_or_emergency_is_invalid(
    network: NetworkFactory, purpose: str
) -> None:
    net = await network(n=1)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway_search(net, 0, net.tokens[0], purpose)

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == (
        f"purpose of use must be one of treatment, emergency, not {purpose!r}"
    )


@pytest.mark.parametrize("purpose", ["treatment", "emergency"])
async def test_treatment_and_emergency_are_accepted(network: NetworkFactory, purpose: str) -> None:
    net = await network(n=1)
    reason = "unconscious at the emergency department" if purpose == "emergency" else ""
    events = await gateway_search(net, 0, net.tokens[0], purpose, reason)
    assert events and events[0].HasField("located")


async def test_emergency_without_a_reason_is_refused(network: NetworkFactory) -> None:
    net = await network(n=1)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway_search(net, 0, net.tokens[0], "emergency")
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "reason" in (caught.value.details() or "")
