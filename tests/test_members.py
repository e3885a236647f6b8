"""``transmural-admin members``: the operator's view of who is in the network.

A real registry on loopback with mutual TLS; invites, joins, revokes and the
nodes' registrations go through the registry's own code, and the command
reads the database they wrote, beside the running registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import re
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from registry import operator
from registry.network import NetworkFiles, init_network
from registry.server import RegistryServer
from registry.store import RegistryStore
from tests.registry_pki import OffsetClock, mint_node, registry_channel
from tools import admin
from tools.admin_members import members_text
from tools.join import JoinedNode, join
from transmural import pki, transport
from transmural.v1 import common_pb2, registry_pb2
from transmural.v1.registry_pb2_grpc import RegistryStub

DAY = 86400


@dataclass
class Network:
    files: NetworkFiles
    db: Path
    registry: RegistryServer
    serials: dict[str, str]  # node id -> the serial of the certificate it holds now


async def invite(net: Network, org_id: str, name: str, **kwargs: object) -> str:
    return await operator.invite(
        net.files.folder, net.db, org_id, name,
        join_address=net.registry.join_address or "", **kwargs,  # type: ignore[arg-type]
    )  # fmt: skip


async def join_and_register(net: Network, token: str, folder: Path, endpoint: str = "") -> None:
    joined: JoinedNode = await join(token, folder)
    net.serials[joined.node_id] = pki.identity(pki.read_certificate(joined.paths.node_cert)).serial
    if not endpoint:
        return
    tls = transport.TlsFiles.load(
        joined.paths.ca_cert, joined.paths.node_cert, joined.paths.node_key
    )
    async with registry_channel(joined.registry_endpoint, tls) as channel:
        node = common_pb2.NodeInfo(organisation_name="", organisation_id="", endpoint=endpoint)
        await RegistryStub(channel).RegisterNode(registry_pb2.RegisterNodeRequest(node=node))


@pytest.fixture
async def network(tmp_path: Path) -> AsyncIterator[Network]:
    """A registry serving. Nodes: ura-1 joined and registered, ura-2 joined and was
    revoked, ura-6 was revoked and re-joined (never registered). Invites: ura-3's
    is open, ura-4's was withdrawn by a revoke, ura-5's expired unused."""
    files = init_network(tmp_path / "net", "Members test")
    db = tmp_path / "registry.db"
    registry = RegistryServer(db, network_dir=files.folder)
    await registry.start()
    net = Network(files, db, registry, {})
    try:
        token = await invite(net, "URA-1", "Huisartsen West", organisation_category="gp")
        await join_and_register(net, token, tmp_path / "n1", "127.0.0.1:7401")
        await join_and_register(net, await invite(net, "URA-2", "Apotheek Noord"), tmp_path / "n2")
        await operator.revoke(db, "URA-2")
        await join_and_register(net, await invite(net, "URA-6", "Kliniek"), tmp_path / "n6a")
        await operator.revoke(db, "URA-6")
        token = await invite(net, "URA-6", "Kliniek", node_id="ura-6")
        await join_and_register(net, token, tmp_path / "n6b")
        await invite(net, "URA-3", "Ziekenhuis Oost")
        await invite(net, "URA-4", "Verpleeghuis Zuid")
        await operator.revoke(db, "URA-4")
        await invite(net, "URA-5", "Tandarts", ttl_s=3600, clock=OffsetClock(-2 * 3600))
        yield net
    finally:
        await registry.stop(0)


def members(*args: str) -> tuple[int, str, str]:
    """``transmural-admin members ...`` in this process: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = admin.main(["members", *args])
    return code, out.getvalue(), err.getvalue()


def line_of(text: str, *parts: str) -> str:
    """The one line of ``text`` holding every part."""
    (line,) = [line for line in text.splitlines() if all(p in line for p in parts)]
    return line


async def test_members_shows_each_node_and_invite_as_a_table(network: Network) -> None:
    code, out, err = await asyncio.to_thread(members, "--db", str(network.db))

    assert code == 0 and err == ""
    serving = line_of(out, "ura-1")
    assert "URA-1  Huisartsen West (gp)" in serving and network.serials["ura-1"] in serving
    assert " serving " in serving and "expires in 364 days" in serving
    assert re.search(r"  \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00 from 127.0.0.1:7401$", serving)
    revoked = line_of(out, "ura-2")
    assert "URA-2  Apotheek Noord" in revoked and network.serials["ura-2"] in revoked
    assert " revoked 20" in revoked and revoked.endswith(" -")
    rejoined = line_of(out, "ura-6")
    assert network.serials["ura-6"] in rejoined and "serving (re-joined; 1 earlier" in rejoined
    assert rejoined.endswith("  not registered")
    assert "ura-3" in line_of(out.partition("open invites (1):")[2], "URA-3  Ziekenhuis Oost")
    ended = out.partition("invites ended unused (2):")[2]
    assert "withdrawn 20" in line_of(ended, "ura-4") and "(organisation revoked)" in ended
    assert "expired unused 20" in line_of(ended, "ura-5", "URA-5  Tandarts")
    assert out.splitlines()[-1] == "2 nodes serving, 1 revoked, 1 open invite"


async def test_members_json_has_every_node_and_invite(network: Network) -> None:
    code, out, _ = await asyncio.to_thread(members, "--db", str(network.db), "--json")

    assert code == 0
    shown = json.loads(out)
    assert shown["schema_version"] == 1
    nodes = {node["node_id"]: node for node in shown["nodes"]}
    assert list(nodes) == ["ura-1", "ura-2", "ura-6"]
    one, two, six = nodes["ura-1"], nodes["ura-2"], nodes["ura-6"]
    assert (one["state"], one["organisation_name"], one["organisation_category"]) == (
        "serving", "Huisartsen West", "gp"
    )  # fmt: skip
    assert one["certificate_serial"] == network.serials["ura-1"] and one["days_left"] == 364
    assert one["endpoint"] == "127.0.0.1:7401" and one["last_registered_at"].endswith("+00:00")
    assert one["revoked_at"] is None and one["earlier_serials"] == []
    assert (two["state"], two["certificate_serial"]) == ("revoked", network.serials["ura-2"])
    assert two["revoked_at"] is not None and two["endpoint"] is None
    assert six["state"] == "serving" and len(six["earlier_serials"]) == 1
    assert (six["endpoint"], six["last_registered_at"]) == (None, None)
    assert six["earlier_serials"] != [six["certificate_serial"]]
    assert [i["node_id"] for i in shown["open_invites"]] == ["ura-3"]
    assert [(i["node_id"], i["ended"]) for i in shown["ended_invites"]] == [
        ("ura-4", "revoked"), ("ura-5", "expired")
    ]  # fmt: skip
    assert shown["uncertified"] == []
    assert shown["summary"] == {"serving": 2, "revoked": 1, "expired": 0, "open_invites": 1}


async def test_a_year_on_the_certificates_and_invites_have_expired(network: Network) -> None:
    found = await operator.members(network.db, OffsetClock(366 * DAY))

    assert [(n.node_id, n.state) for n in found.nodes] == [
        ("ura-1", "expired"), ("ura-2", "revoked"), ("ura-6", "expired")
    ]  # fmt: skip
    assert found.open_invites == []
    text = members_text(found)
    assert "EXPIRED" in line_of("\n".join(text), "ura-1")
    assert text[-1] == "0 nodes serving, 1 revoked, 0 open invites, 2 with an expired certificate"


async def test_members_changes_nothing_in_the_database(network: Network) -> None:
    await network.registry.stop(0)  # its own writes (none are due) are out of the picture

    def contents() -> tuple[bytes, list[str]]:
        with sqlite3.connect(f"file:{network.db}?mode=ro", uri=True) as db:
            dump = list(db.iterdump())
        db.close()
        return network.db.read_bytes(), dump

    before = await asyncio.to_thread(contents)
    for args in ((), ("--json",)):
        assert (await asyncio.to_thread(members, "--db", str(network.db), *args))[0] == 0
    assert await asyncio.to_thread(contents) == before


def test_a_missing_database_is_one_line_and_no_file(tmp_path: Path) -> None:
    missing = tmp_path / "registry.db"

    code, out, err = members("--db", str(missing))

    assert (code, out) == (2, "")
    assert err == (
        f"transmural-admin: there is no registry database {missing}: "
        "give the --db the registry serves with\n"
    )
    assert list(tmp_path.iterdir()) == []


async def test_organisation_names_and_ids_are_printed_escaped(tmp_path: Path) -> None:
    """Invite refuses such text now; a database written before that may still hold it."""
    files = init_network(tmp_path / "net", "Members test")
    db = tmp_path / "registry.db"
    await (await RegistryStore.open(db)).close()  # as the registry makes it
    await operator.invite(files.folder, db, "URA-1", "Huisartsen West")

    def older_invite() -> None:
        with sqlite3.connect(db) as conn:
            conn.execute(
                "INSERT INTO invites (secret_hash, node_id, organisation_id, organisation_name,"
                " created_at, expires_at) VALUES (?, 'ura-9', ?, ?, 0, 1e10)",
                (hashlib.sha256(b"old").digest(), "URA-\n9", "Evil\x1b[2J Corp"),
            )
        conn.close()

    await asyncio.to_thread(older_invite)

    code, out, _ = await asyncio.to_thread(members, "--db", str(db))

    assert code == 0 and "\x1b" not in out
    assert "URA-\\n9  Evil\\x1b[2J Corp" in line_of(out, "ura-9")


async def test_a_node_registered_without_a_certificate_of_ours_is_listed_apart(
    network: Network,
) -> None:
    """A certificate made by hand from the CA never passed through an invite."""
    tls = mint_node(network.files, "hand-1", "URA-7", "Handmatig")
    async with registry_channel(network.registry.address, tls) as channel:
        node = common_pb2.NodeInfo(endpoint="127.0.0.1:7407")
        await RegistryStub(channel).RegisterNode(registry_pb2.RegisterNodeRequest(node=node))

    _, out, _ = await asyncio.to_thread(members, "--db", str(network.db), "--json")
    _, text, _ = await asyncio.to_thread(members, "--db", str(network.db))

    shown = json.loads(out)
    assert [(n["node_id"], n["endpoint"]) for n in shown["uncertified"]] == [
        ("hand-1", "127.0.0.1:7407")
    ]
    assert "hand-1" not in {n["node_id"] for n in shown["nodes"]}
    assert "URA-7  Handmatig" in line_of(text.partition("without a certificate")[2], "hand-1")
