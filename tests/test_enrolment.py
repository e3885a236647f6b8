"""Invite, join and mutual TLS at the registry (flow 2): real TLS on loopback, no mocks."""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
import stat
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health, health_pb2_grpc

from registry import const, operator
from registry.enrolment import node_id_for
from registry.network import NetworkFiles, init_network, load_network
from registry.server import RegistryServer, check_requires_client_certificates
from tests.registry_pki import OffsetClock, mint_node, registry_channel, wait_for
from tools.join import FILES, JoinedNode, join
from transmural import invite, pki, transport
from transmural.errors import ConfigError, InvalidInput, NotFound, PermissionDenied, Unavailable
from transmural.pseudonym import read_network_key
from transmural.v1 import common_pb2, enrolment_pb2, enrolment_pb2_grpc, registry_pb2
from transmural.v1.registry_pb2_grpc import RegistryStub

ORG_ID = "URA 12345678"
ORG_NAME = "Ziekenhuis Oost"


@pytest.fixture
def network(tmp_path: Path) -> NetworkFiles:
    return init_network(tmp_path / "network", "Test network")


@pytest.fixture
def clock() -> OffsetClock:
    return OffsetClock()


@pytest.fixture
async def registry(
    tmp_path: Path, network: NetworkFiles, clock: OffsetClock
) -> AsyncIterator[RegistryServer]:
    server = RegistryServer(tmp_path / "registry.db", network_dir=network.folder, clock=clock)
    await server.start()
    yield server
    await server.stop(0)


async def make_invite(
    registry: RegistryServer, org_id: str = ORG_ID, node_id: str | None = None, ttl_s: int = 3600
) -> str:
    assert registry.membership is not None and registry.join_address is not None
    return await registry.membership.create_invite(
        org_id, ORG_NAME, node_id, registry.join_address, ttl_s
    )


def db_rows(db: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute(sql).fetchall()
    conn.close()
    return rows


def certificates_in(registry_db: Path) -> list[tuple[object, ...]]:
    return db_rows(registry_db, "SELECT node_id, organisation_id FROM certificates")


def joined_tls(joined: JoinedNode) -> transport.TlsFiles:
    return transport.TlsFiles.load(
        joined.paths.ca_cert, joined.paths.node_cert, joined.paths.node_key
    )


async def refused(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value


# --- network folder ---


def test_network_init_writes_private_files_and_refuses_to_overwrite(tmp_path: Path) -> None:
    folder = tmp_path / "net"
    made = init_network(folder, "Regio Oost")

    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for name in ("ca.key", "registry.key", "network.key"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600, name
    loaded = load_network(folder)
    assert loaded.ca_fingerprint == made.ca_fingerprint
    assert loaded.network_key == made.network_key
    assert loaded.name == "Regio Oost"
    registry_cert = x509.load_pem_x509_certificate(loaded.tls.cert_pem)
    assert pki.bootstrap_ca(registry_cert, made.ca_fingerprint) == made.ca_cert

    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(ConfigError, match="already holds a network"):
        init_network(folder, "Again")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_load_network_names_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="network init"):
        load_network(tmp_path / "none")
    folder = tmp_path / "net"
    init_network(folder, "N")
    (folder / "network.key").unlink()
    with pytest.raises(ConfigError, match=r"incomplete: network\.key missing"):
        load_network(folder)


# --- join ---


async def test_join_round_trip(
    registry: RegistryServer, network: NetworkFiles, tmp_path: Path
) -> None:
    token = await make_invite(registry)
    node_dir = tmp_path / "facility" / "node"

    joined = await join(token, node_dir)

    assert (joined.node_id, joined.organisation_id, joined.organisation_name) == (
        "ura-12345678",
        ORG_ID,
        ORG_NAME,
    )
    assert joined.registry_endpoint == registry.address
    cert = pki.read_certificate(joined.paths.node_cert)
    subject = cert.subject
    assert subject.get_attributes_for_oid(NameOID.ORGANIZATION_IDENTIFIER)[0].value == ORG_ID
    assert subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "ura-12345678"
    assert pki.read_certificate(joined.paths.ca_cert) == network.ca_cert
    assert read_network_key(joined.paths.network_key) == network.network_key
    assert pki.read_private_key(joined.paths.node_key).public_key() == cert.public_key()
    assert stat.S_IMODE(node_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(joined.paths.node_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(joined.paths.network_key.stat().st_mode) == 0o600
    assert sorted(p.name for p in node_dir.iterdir()) == sorted(FILES)
    assert certificates_in(tmp_path / "registry.db") == [("ura-12345678", ORG_ID)]

    # The joined node talks to the registry over mutual TLS, as itself.
    async with registry_channel(joined.registry_endpoint, joined_tls(joined)) as channel:
        stub = RegistryStub(channel)
        wire = common_pb2.NodeInfo(
            organisation_name="Claimed Name", organisation_id="URA-claimed", endpoint="h:7400"
        )
        reply = await stub.RegisterNode(registry_pb2.RegisterNodeRequest(node=wire))
        assert (reply.node.node_id, reply.node.organisation_id, reply.node.organisation_name) == (
            "ura-12345678",
            ORG_ID,
            ORG_NAME,
        )
        published = await stub.Publish(
            registry_pb2.PublishRequest(entries=[registry_pb2.IndexEntry(pseudonym=b"p" * 32)])
        )
        assert published.published == 1
        located = await stub.Locate(registry_pb2.LocateRequest(pseudonyms=[b"p" * 32]))
        assert [h.node_id for h in located.locations[0].holders] == ["ura-12345678"]


async def test_a_reused_token_is_refused_and_changes_nothing(
    registry: RegistryServer, tmp_path: Path
) -> None:
    token = await make_invite(registry)
    await join(token, tmp_path / "first")

    with pytest.raises(PermissionDenied, match="this invite was already used at 20"):
        await join(token, tmp_path / "second")

    assert not (tmp_path / "second").exists()
    assert certificates_in(tmp_path / "registry.db") == [("ura-12345678", ORG_ID)]


async def test_an_expired_token_is_refused_by_the_registry(
    registry: RegistryServer, clock: OffsetClock, tmp_path: Path
) -> None:
    token = await make_invite(registry, ttl_s=60)
    clock.advance(61)  # the registry's clock: the node's own still says it is valid

    with pytest.raises(PermissionDenied, match=r"this invite expired at 20\S+ \S+ UTC"):
        await join(token, tmp_path / "node")

    assert not (tmp_path / "node").exists()
    assert certificates_in(tmp_path / "registry.db") == []
    assert db_rows(tmp_path / "registry.db", "SELECT used_at FROM invites") == [(None,)]


async def test_an_expired_token_is_refused_before_dialling(
    registry: RegistryServer, clock: OffsetClock, tmp_path: Path
) -> None:
    clock.advance(-7200)  # issued two hours ago, valid for one
    token = await make_invite(registry, ttl_s=3600)
    await registry.stop(0)  # join must not need the registry to say so

    with pytest.raises(InvalidInput, match="this invite expired at"):
        await join(token, tmp_path / "node")
    assert not (tmp_path / "node").exists()


async def test_an_unknown_token_is_refused(
    registry: RegistryServer, network: NetworkFiles, tmp_path: Path
) -> None:
    assert registry.join_address is not None
    never_recorded = invite.new_token(registry.join_address, network.ca_fingerprint, 0, 10**10)

    with pytest.raises(PermissionDenied, match="this invite token is not known to the registry"):
        await join(invite.encode(never_recorded), tmp_path / "node")
    assert not (tmp_path / "node").exists()


async def test_a_tampered_token_is_refused(registry: RegistryServer, tmp_path: Path) -> None:
    token = await make_invite(registry)
    middle = len(token) // 2
    tampered = token[:middle] + ("A" if token[middle] != "A" else "B") + token[middle + 1 :]

    with pytest.raises(InvalidInput, match="damaged"):
        await join(tampered, tmp_path / "node")

    assert not (tmp_path / "node").exists()
    await join(token, tmp_path / "node")  # the real token still works


async def test_a_registry_of_another_network_is_refused_before_the_csr_is_sent(
    registry: RegistryServer, tmp_path: Path
) -> None:
    other = RegistryServer(
        tmp_path / "other.db", network_dir=init_network(tmp_path / "other", "Other").folder
    )
    await other.start()
    try:
        assert registry.membership is not None and other.join_address is not None
        # A token of our network that points at the other network's registry.
        token = await registry.membership.create_invite(ORG_ID, ORG_NAME, None, other.join_address)

        # Had the CSR been sent, the other registry would answer "not known".
        with pytest.raises(InvalidInput, match="does not match the fingerprint in the invite"):
            await join(token, tmp_path / "node")

        assert not (tmp_path / "node").exists()
        assert certificates_in(tmp_path / "other.db") == []
        assert certificates_in(tmp_path / "registry.db") == []
    finally:
        await other.stop(0)


async def test_an_already_joined_folder_is_not_overwritten(
    registry: RegistryServer, tmp_path: Path
) -> None:
    await join(await make_invite(registry), tmp_path / "node")
    before = {p.name: p.read_bytes() for p in (tmp_path / "node").iterdir()}
    second = await make_invite(registry, org_id="URA 2")

    with pytest.raises(ConfigError, match="already holds a joined node"):
        await join(second, tmp_path / "node")

    assert {p.name: p.read_bytes() for p in (tmp_path / "node").iterdir()} == before
    await join(second, tmp_path / "elsewhere")  # refused before the token was used


async def test_a_folder_that_cannot_be_written_leaves_the_invite_unused(
    registry: RegistryServer, tmp_path: Path
) -> None:
    token = await make_invite(registry)
    (tmp_path / "a-file").write_text("not a folder")

    with pytest.raises(ConfigError, match=r"cannot write in the node folder .*still unused"):
        await join(token, tmp_path / "a-file")

    assert certificates_in(tmp_path / "registry.db") == []
    await join(token, tmp_path / "node")  # the same invite still works


def join_stub(registry: RegistryServer, network: NetworkFiles) -> enrolment_pb2_grpc.EnrolmentStub:
    assert registry.join_address is not None
    channel = transport.open_channel(
        registry.join_address, transport.TlsFiles(pki.pem(network.ca_cert)), pki.REGISTRY_DNS_NAME
    )
    return enrolment_pb2_grpc.EnrolmentStub(channel)


def csr_der(key: pki.PrivateKey) -> bytes:
    return pki.make_csr(key, "x").public_bytes(serialization.Encoding.DER)


async def test_a_bad_csr_is_invalid_and_leaves_the_invite_usable(
    registry: RegistryServer, network: NetworkFiles, tmp_path: Path
) -> None:
    token = invite.decode(await make_invite(registry))
    stub = join_stub(registry, network)

    error = await refused(
        stub.Join(enrolment_pb2.JoinRequest(invite_secret=token.secret, csr_der=b"not a csr"))
    )

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "the certificate request is not a DER PKCS#10 request"
    reply = await stub.Join(
        enrolment_pb2.JoinRequest(
            invite_secret=token.secret, csr_der=csr_der(pki.new_private_key())
        )
    )
    assert reply.node.node_id == "ura-12345678"


async def test_two_joins_racing_for_one_invite_admit_one_node(
    registry: RegistryServer, network: NetworkFiles, tmp_path: Path
) -> None:
    token = invite.decode(await make_invite(registry))
    stub = join_stub(registry, network)
    requests = [
        enrolment_pb2.JoinRequest(
            invite_secret=token.secret, csr_der=csr_der(pki.new_private_key())
        )
        for _ in range(8)
    ]

    outcomes = await asyncio.gather(*(stub.Join(r) for r in requests), return_exceptions=True)

    admitted = [o for o in outcomes if isinstance(o, enrolment_pb2.JoinResponse)]
    errors = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(admitted) == 1 and len(errors) == 7
    assert {e.code() for e in errors} == {grpc.StatusCode.PERMISSION_DENIED}
    assert len(certificates_in(tmp_path / "registry.db")) == 1


async def test_invites_refuse_a_node_id_already_taken(
    registry: RegistryServer, tmp_path: Path
) -> None:
    await make_invite(registry, node_id="gp-west")
    with pytest.raises(InvalidInput) as held:
        await make_invite(registry, org_id="URA 2", node_id="gp-west")
    assert re.fullmatch(
        r"node id gp-west already has a pending invite, of organisation URA 12345678, open "
        r"until 20\S+ \S+ UTC: `transmural-admin revoke --db REGISTRY_DB --org-id "
        r"'URA 12345678'` closes it at once \(and revokes any certificate of URA 12345678\), "
        r"so a new invite can be made; or give another --node-id",
        str(held.value),
    )
    # As it says: a lost token need not keep the node id until the invite expires.
    await operator.revoke(tmp_path / "registry.db", ORG_ID)
    await make_invite(registry, org_id="URA 2", node_id="gp-west")
    with pytest.raises(InvalidInput, match="node_id must be 1-64 characters"):
        await make_invite(registry, node_id="GP West")
    with pytest.raises(InvalidInput, match="cannot derive a node id"):
        await make_invite(registry, org_id="!!!")


async def test_invites_refuse_names_a_clinician_could_misread(registry: RegistryServer) -> None:
    assert registry.membership is not None
    for org_id, org_name, address, says in (
        (ORG_ID, "GP\u200bWest", "", "organisation name has invisible"),
        (ORG_ID, "GP \u202etseW", "", "organisation name has invisible"),
        (ORG_ID, "\u3164", "", "organisation name has invisible"),  # a Hangul filler: blank
        (ORG_ID, "\u2800\u2800", "", "organisation name has invisible"),
        (ORG_ID, "...", "", "no letter or digit"),
        ("URA\u00a012", ORG_NAME, "", "organisation id must be printable ASCII"),
        ("URA-\u0661\u0662", ORG_NAME, "", "organisation id must be printable ASCII"),
        (ORG_ID, ORG_NAME, "0.0.0.0:7001", "is where the registry listens"),
        (ORG_ID, ORG_NAME, "[::]:7001", "is where the registry listens"),
        (ORG_ID, ORG_NAME, "999.1.1.1:7001", "has no valid IPv4 address"),
        (ORG_ID, ORG_NAME, "1.2.3.4.5:7001", "has no valid IPv4 address"),
    ):
        with pytest.raises(InvalidInput, match=says):
            await registry.membership.create_invite(org_id, org_name, None, address, 3600)
    # Names and addresses people do use are fine.
    await registry.membership.create_invite(ORG_ID, "Huisartsen Zuid-Oost", None,
                                            "registry.example:7001", 3600)  # fmt: skip
    await registry.membership.create_invite("URA 2", "Ziekenhuis Gelre", None, "[::1]:7001")


async def test_a_joined_node_id_is_free_again_only_after_revocation(
    registry: RegistryServer, tmp_path: Path
) -> None:
    await join(await make_invite(registry), tmp_path / "a")
    with pytest.raises(InvalidInput, match="already belongs to a joined node"):
        await make_invite(registry, org_id="URA 12345678")

    await operator.revoke(tmp_path / "registry.db", ORG_ID)
    taken = node_id_for(ORG_ID)
    with pytest.raises(InvalidInput, match=f"node id {taken} belonged to organisation {ORG_ID}"):
        await make_invite(registry, org_id="URA 99999999", node_id=taken)  # not another's

    assert registry.membership is not None and registry.join_address
    with pytest.raises(InvalidInput, match=r"joined before with no category.* no --category"):
        await registry.membership.create_invite(  # a kind that would change consents by kind
            ORG_ID, ORG_NAME, None, registry.join_address, organisation_category="pharmacy"
        )
    await join(await make_invite(registry), tmp_path / "b")


async def test_operator_invite_goes_through_the_registry_database(
    registry: RegistryServer, network: NetworkFiles, tmp_path: Path
) -> None:
    assert registry.join_address is not None
    token = await operator.invite(
        network.folder, tmp_path / "registry.db", "AGB 0101", "Huisarts", "gp-1",
        registry.join_address,
    )  # fmt: skip

    joined = await join(token, tmp_path / "node")

    assert (joined.node_id, joined.organisation_id) == ("gp-1", "AGB 0101")
    with pytest.raises(ConfigError, match="there is no registry database"):
        await operator.invite(network.folder, tmp_path / "typo.db", "A", "B")
    assert not (tmp_path / "typo.db").exists()
    (tmp_path / "empty.db").touch()  # SQLite would take an empty file as a new database
    with pytest.raises(ConfigError, match="there is no registry database"):
        await operator.revoke(tmp_path / "empty.db", "AGB 0101")
    assert (tmp_path / "empty.db").stat().st_size == 0


# --- the mutual-TLS port ---


async def list_nodes(address: str, tls: transport.TlsFiles | None, **kw: NetworkFiles) -> object:
    async with registry_channel(address, tls, **kw) as channel:
        return await RegistryStub(channel).ListNodes(registry_pb2.ListNodesRequest(), timeout=5)


async def test_a_call_without_a_client_certificate_is_refused(
    registry: RegistryServer, network: NetworkFiles
) -> None:
    error = await refused(list_nodes(registry.address, transport.TlsFiles(network.tls.ca_pem)))
    assert error.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_certificate_of_another_ca_is_refused(
    registry: RegistryServer, network: NetworkFiles, tmp_path: Path
) -> None:
    foreign = mint_node(init_network(tmp_path / "foreign", "Foreign"), "node-1")
    error = await refused(list_nodes(registry.address, foreign, trust=network))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    # The same request with a certificate of this network's CA is answered.
    await list_nodes(registry.address, mint_node(network, "node-1"))


async def test_an_expired_certificate_is_refused(
    registry: RegistryServer, network: NetworkFiles
) -> None:
    long_ago = datetime.now(UTC) - timedelta(days=30)
    expired = mint_node(network, "node-1", now=long_ago, days=1)
    error = await refused(list_nodes(registry.address, expired))
    assert error.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_revoked_node_is_refused_within_the_refresh_interval(
    registry: RegistryServer, tmp_path: Path
) -> None:
    revoked = await join(await make_invite(registry), tmp_path / "revoked")
    other = await join(await make_invite(registry, org_id="URA 2"), tmp_path / "other")
    channel = registry_channel(registry.address, joined_tls(revoked))
    stub = RegistryStub(channel)
    await stub.RegisterNode(
        registry_pb2.RegisterNodeRequest(node=common_pb2.NodeInfo(endpoint="127.0.0.1:7401"))
    )
    await stub.ListNodes(registry_pb2.ListNodesRequest())

    # As `transmural-admin revoke` does it: another connection to the database.
    serials, _ = await operator.revoke(tmp_path / "registry.db", ORG_ID)

    async def is_refused() -> bool:
        try:
            await stub.ListNodes(registry_pb2.ListNodesRequest())
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED
            assert error.details() == "the certificate of node ura-12345678 has been revoked"
            return True
        return False

    took = await wait_for(is_refused, seconds=const.REVOCATION_REFRESH_S * 3)
    assert took <= const.REVOCATION_REFRESH_S + 0.5
    await channel.close()

    assert serials == [pki.identity(pki.read_certificate(revoked.paths.node_cert)).serial]
    async with registry_channel(registry.address, joined_tls(other)) as channel:
        stub = RegistryStub(channel)
        listed = await stub.ListRevocations(registry_pb2.ListRevocationsRequest())
        assert [(r.serial, r.node_id, r.organisation_id) for r in listed.revocations] == [
            (serials[0], "ura-12345678", ORG_ID)
        ]
        # A revoked node leaves the directory, so no search is sent to it.
        assert not (await stub.ListNodes(registry_pb2.ListNodesRequest())).nodes
    # Revoking again finds nothing left to revoke.
    assert await operator.revoke(tmp_path / "registry.db", ORG_ID) == ([], 0)


async def test_revoking_an_unknown_organisation_is_not_found(
    registry: RegistryServer, tmp_path: Path
) -> None:
    with pytest.raises(NotFound, match="organisation URA 9 has no certificates: it never joined"):
        await operator.revoke(tmp_path / "registry.db", "URA 9")


async def test_revoking_an_organisation_that_never_joined_closes_its_open_invites(
    registry: RegistryServer, network: NetworkFiles, tmp_path: Path
) -> None:
    """A leaked or mis-sent invite can be taken back before anyone joins with it."""
    token = await make_invite(registry)

    assert await operator.revoke(tmp_path / "registry.db", ORG_ID) == ([], 1)

    # Not "expired": the operator had shown it open for another hour.
    withdrawn = (
        r"this invite was withdrawn by the operator at 20\S+ \S+ UTC: "
        rf"organisation {ORG_ID} was revoked; ask the operator whether to invite it again"
    )
    with pytest.raises(PermissionDenied, match=withdrawn):
        await join(token, tmp_path / "node")
    error = await refused(
        join_stub(registry, network).Join(
            enrolment_pb2.JoinRequest(
                invite_secret=invite.decode(token).secret,
                csr_der=csr_der(pki.new_private_key()),
            )
        )
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED  # as for an expired invite
    assert certificates_in(tmp_path / "registry.db") == []
    with pytest.raises(NotFound, match="never joined"):  # nothing left to close or revoke
        await operator.revoke(tmp_path / "registry.db", ORG_ID)


@pytest.mark.parametrize(
    ("method", "request_", "message"),
    [
        (
            "Publish",
            registry_pb2.PublishRequest(node_id="node-3"),
            "node-2's certificate cannot publish for node-3",
        ),
        (
            "RegisterNode",
            registry_pb2.RegisterNodeRequest(
                node=common_pb2.NodeInfo(node_id="node-3", endpoint="127.0.0.1:7403")
            ),
            "node-2's certificate cannot register as node-3",
        ),
    ],
)
async def test_a_node_cannot_act_for_another(
    registry: RegistryServer, network: NetworkFiles, method: str, request_: object, message: str
) -> None:
    async with registry_channel(registry.address, mint_node(network, "node-2")) as channel:
        stub = RegistryStub(channel)
        error = await refused(getattr(stub, method)(request_))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error.details() == message


async def test_the_self_check_passes_for_a_normal_server(
    registry: RegistryServer, network: NetworkFiles
) -> None:
    await check_requires_client_certificates(registry.address, network.tls)


async def test_the_self_check_fails_for_a_port_without_client_certificates(
    network: NetworkFiles,
) -> None:
    server = transport.new_server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    address = transport.bind(server, "127.0.0.1:0", network.tls, client_certificates=False)
    await server.start()
    try:
        with pytest.raises(ConfigError, match="does not require client certificates"):
            await check_requires_client_certificates(address, network.tls)
    finally:
        await server.stop(0)


async def test_start_up_warns_before_the_registry_certificate_expires(
    tmp_path: Path, network: NetworkFiles, caplog: pytest.LogCaptureFixture
) -> None:
    days_left = 10
    offset = (pki.REGISTRY_DAYS - days_left) * 86400.0
    server = RegistryServer(
        tmp_path / "r.db", network_dir=network.folder, clock=OffsetClock(offset)
    )
    with caplog.at_level(logging.WARNING, logger="registry.server"):
        await server.start()
    await server.stop(0)

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [
        w for w in warnings if w.startswith(f"the registry certificate expires in {days_left} days")
    ]
    assert not [w for w in warnings if "network CA" in w]


async def test_a_join_port_that_never_answers_is_named_as_such(
    network: NetworkFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listener that accepts and never speaks TLS: said in words, not an empty reason."""
    monkeypatch.setattr("tools.join.HANDSHAKE_TIMEOUT_S", 0.3)
    accepted: list[asyncio.StreamWriter] = []

    async def keep(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    silent = await asyncio.start_server(keep, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    token = invite.encode(invite.new_token(f"127.0.0.1:{port}", network.ca_fingerprint, 0, 10**10))
    try:
        with pytest.raises(Unavailable, match=r"no TLS handshake within 0\.3 s"):
            await join(token, tmp_path / "node")
    finally:
        silent.close()
        for writer in accepted:
            writer.close()
    assert not (tmp_path / "node").exists()
