"""compose/: the container deployment, checked without a container engine.

The compose file is parsed; the entrypoint script is *run* by ``sh`` for each
service with stand-ins for our console scripts that record their arguments,
and every recorded command line goes through the real CLI's ``main`` (so a
renamed flag or script fails here). The first-start logic is then run for
real, as processes against a registry on loopback, twice: the second time
must change nothing. devnet must join through the same function.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import importlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

import tools.bootstrap
import tools.devnet
from registry import operator
from registry.enrolment import CertificateRecord, Membership
from registry.network import init_network
from registry.server import RegistryServer
from registry.store import RegistryStore
from tests.registry_pki import OffsetClock
from tools.bootstrap import NETWORK_DIR, NODE_CONFIG, REGISTRY_DB, InviteSpec, token_path
from tools.supervise import start_server
from transmural import invite
from transmural.errors import ConfigError, InvalidInput, PermissionDenied
from transmural.identifiers import BSN_SYSTEM

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "compose"
ENTRYPOINT = COMPOSE / "entrypoint.sh"
ADMIN = [sys.executable, "-m", "tools.admin"]
SCRIPTS: dict[str, str] = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
#: What each console script's main is stopped at, once its arguments are parsed.
PARSED_AT = {
    "tools.admin": ("tools.bootstrap", "run"),
    "registry.cli": ("registry.cli", "serve"),
    "node.cli": ("node.cli", "serve"),
}


class Parsed(BaseException):
    """Raised where a CLI would start working: its arguments were accepted."""

    def __init__(self, args: Any) -> None:
        self.args_seen = args


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((COMPOSE / "compose.yaml").read_text())
    return document


def services(compose: dict[str, Any], role: str | None = None) -> dict[str, dict[str, Any]]:
    found = compose["services"]
    return {n: s for n, s in found.items() if role is None or s["command"][0] == role}


def default(variable: str) -> str:
    """The default the entrypoint gives ``${variable:-default}``."""
    match = re.search(rf"\${{{variable}:-([^}}]+)}}", ENTRYPOINT.read_text())
    assert match, f"entrypoint.sh has no default for {variable}"
    return match[1]


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Container path -> (volume, mode) of a service."""
    found = {}
    for entry in service.get("volumes", []):
        volume, path, *mode = entry.split(":")
        found[path] = (volume, mode[0] if mode else "rw")
    return found


def published(service: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(host ip, host port, container port) of each published port."""
    result = []
    for entry in service.get("ports", []):
        ip, host, container = str(entry).split(":")
        result.append((ip, int(host), int(container)))
    return result


# --- the compose file and the image ---


def test_every_service_runs_our_entrypoint_with_a_role(compose: dict[str, Any]) -> None:
    dockerfile = (COMPOSE / "Dockerfile").read_text()
    entry = json.loads(re.search(r"^ENTRYPOINT (.+)$", dockerfile, re.M)[1])
    assert entry == ["transmural-entrypoint"]
    assert "COPY compose/entrypoint.sh /usr/local/bin/transmural-entrypoint" in dockerfile
    assert re.search(r"^FROM python:3\.11-slim$", dockerfile, re.M)
    assert "grpc_tools.protoc" in dockerfile  # stubs generated in the image
    assert os.access(ENTRYPOINT, os.X_OK)
    assert ENTRYPOINT.read_text().startswith("#!/bin/sh\n")
    assert len(services(compose, "registry")) == 1
    for name, service in compose["services"].items():
        assert "entrypoint" not in service, name
        assert service["build"] == {"context": "..", "dockerfile": "compose/Dockerfile"}, name
        assert service["command"][0] in ("registry", "node"), name
    for name, service in services(compose, "node").items():
        # The node id is the service's name and host name: peers dial <node id>:7100.
        assert service["command"][1] == name == service["hostname"]
        assert service["depends_on"]["registry"]["condition"] == "service_healthy"
    assert len(services(compose, "node")) == 3


def test_volumes_are_declared_and_each_server_has_its_own(compose: dict[str, Any]) -> None:
    declared = set(compose["volumes"])
    used: set[str] = set()
    data, invites = default("TRANSMURAL_DATA"), default("TRANSMURAL_INVITES")
    data_volumes = []
    for name, service in compose["services"].items():
        found = mounts(service)
        used |= {volume for volume, _ in found.values()}
        assert set(found) == {data, invites}, name
        data_volumes.append(found[data][0])
        registry = service["command"][0] == "registry"
        assert found[invites] == ("invites", "rw" if registry else "ro"), name
    assert used == declared
    assert len(set(data_volumes)) == len(data_volumes) == len(compose["services"])


def test_ports_are_unique_and_on_loopback_only(compose: dict[str, Any]) -> None:
    host_ports = []
    for name, service in compose["services"].items():
        for ip, host, _ in published(service):
            assert ip == "127.0.0.1", name
            host_ports.append(host)
    assert len(host_ports) == len(set(host_ports))


# --- the entrypoint, run with stand-ins for our console scripts ---


def run_entrypoint(tmp_path: Path, name: str, command: list[str]) -> list[list[str]]:
    """Every console script the entrypoint runs for ``command``, paths as in the container."""
    root = tmp_path / name
    stubs, data, invites = root / "bin", root / "data", root / "invites"
    for folder in (stubs, data, invites):
        folder.mkdir(parents=True)
    log = root / "calls.jsonl"
    for script in SCRIPTS:
        stub = stubs / script
        stub.write_text(
            f"#!{sys.executable}\nimport json, sys\n"
            f"open({str(log)!r}, 'a').write(json.dumps(sys.argv) + '\\n')\n"
        )
        stub.chmod(0o755)
    if command[0] == "node":
        (invites / f"{command[1]}.token").write_text("tmi1.stand-in\n")
    env = {
        **os.environ,
        "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}",
        "TRANSMURAL_DATA": str(data),
        "TRANSMURAL_INVITES": str(invites),
        "TRANSMURAL_TOKEN_WAIT_S": "0",
    }
    sh = shutil.which("sh")
    assert sh is not None
    run = subprocess.run(
        [sh, str(ENTRYPOINT), *command], env=env, capture_output=True, text=True, timeout=30
    )
    assert run.returncode == 0, run.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    in_container = {
        str(data): default("TRANSMURAL_DATA"),
        str(invites): default("TRANSMURAL_INVITES"),
    }

    def as_in_container(arg: str) -> str:
        for here, there in in_container.items():
            arg = arg.replace(here, there)
        return arg

    return [[Path(c[0]).name, *map(as_in_container, c[1:])] for c in calls]


def parse(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> argparse.Namespace:
    """``argv`` through the real ``main`` of the console script it names, stopped once parsed."""
    assert argv[0] in SCRIPTS, f"{argv[0]} is not one of our console scripts"
    module_name, function = SCRIPTS[argv[0]].split(":")
    module = importlib.import_module(module_name)
    target_module, target = PARSED_AT[module_name]

    def stop(*args: Any, **kwargs: Any) -> None:
        raise Parsed(args[0])

    with monkeypatch.context() as patch:
        # A flag must be spelt out: argparse would take "--token" for "--token-file".
        patch.setattr(argparse.ArgumentParser, "_get_option_tuples", lambda *a: [])
        patch.setattr(importlib.import_module(target_module), target, stop)
        patch.setattr(module, "configure_logging", lambda *a: None, raising=False)
        patch.setattr(
            "node.cli.NodeConfig.load",
            lambda path, insecure_dev=False: SimpleNamespace(
                config=path, insecure_dev=insecure_dev
            ),
        )
        with pytest.raises(Parsed) as parsed:
            getattr(module, function)(argv[1:])
    seen = parsed.value.args_seen
    return seen if isinstance(seen, argparse.Namespace) else argparse.Namespace(**vars(seen))


def port(address: str) -> int:
    return int(address.rpartition(":")[2])


def test_entrypoint_runs_our_console_scripts_with_valid_arguments(
    compose: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, invites = Path(default("TRANSMURAL_DATA")), Path(default("TRANSMURAL_INVITES"))
    (registry_name, registry), *_ = services(compose, "registry").items()
    calls = run_entrypoint(tmp_path, registry_name, registry["command"])
    assert [c[0] for c in calls] == ["transmural-admin", "transmural-registry"]
    boot, serve = (parse(monkeypatch, c) for c in calls)
    assert (boot.command, boot.role, boot.data, boot.invites_dir) == (
        "bootstrap", "registry", data, invites,
    )  # fmt: skip
    assert (serve.network_dir, serve.db) == (data / NETWORK_DIR, data / REGISTRY_DB)
    assert not serve.insecure_dev
    host, _, join_port = boot.join_address.rpartition(":")
    assert host == registry["hostname"] == registry_name
    assert int(join_port) == port(serve.join_listen)
    published_ports = {c for _, _, c in published(registry)}
    assert published_ports == {port(serve.listen), port(serve.join_listen)}
    # Nodes start once the registry is healthy: the probe must knock on the join port.
    assert f", {port(serve.join_listen)})" in " ".join(registry["healthcheck"]["test"])
    invited = {spec.node_id: spec for spec in boot.invite}
    assert set(invited) == set(services(compose, "node"))
    run_programs = {"transmural-admin", "transmural-registry"}

    for name, node in services(compose, "node").items():
        calls = run_entrypoint(tmp_path, name, node["command"])
        assert [c[0] for c in calls] == ["transmural-admin", "transmural-node"]
        boot, serve = (parse(monkeypatch, c) for c in calls)
        run_programs |= {c[0] for c in calls}
        assert (boot.command, boot.role) == ("bootstrap", "node")
        assert (boot.data, boot.node_id) == (data, name)
        # The node reads its token where the registry writes it.
        assert boot.token_file == token_path(invites, name)
        assert boot.listen.rpartition(":")[0] == node["hostname"]
        assert {c for _, _, c in published(node)} == {port(boot.gateway_listen)}
        assert serve.config == data / NODE_CONFIG
        assert not serve.insecure_dev

    mentioned = set(re.findall(r"\btransmural-[a-z]+\b", ENTRYPOINT.read_text()))
    assert mentioned - {"transmural-entrypoint"} == run_programs  # no branch left unchecked


@pytest.mark.parametrize(
    "argv",
    [
        ["transmural-registry", "serve", "--database", "x.db", "--insecure-dev"],
        ["transmural-node", "serve", "--conf", "node.toml"],
        ["transmural-admin", "bootstrap", "node", "--data", "d", "--token", "t"],
    ],
)
def test_a_renamed_or_shortened_flag_fails_the_check(
    monkeypatch: pytest.MonkeyPatch, argv: list[str]
) -> None:
    with pytest.raises(SystemExit):
        parse(monkeypatch, argv)


# --- the first-start logic, run for real ---


def snapshot(*roots: Path) -> dict[str, tuple[str, int, int]]:
    """Path -> (sha256, mtime_ns, mode) of every file under ``roots``; folders: their mode.

    A folder's mtime is left out: SQLite makes and removes its -wal and -shm
    files beside the database each time it is opened.
    """
    found = {}
    for root in roots:
        for path in [root, *sorted(root.rglob("*"))]:
            info = path.stat()
            if path.is_dir():
                found[str(path)] = ("folder", 0, info.st_mode)
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                found[str(path)] = (digest, info.st_mtime_ns, info.st_mode)
    return found


def admin(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """``transmural-admin`` as the entrypoint runs it (umask 077)."""
    return subprocess.run(
        [*ADMIN, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=60,
        umask=0o077,
    )  # fmt: skip


def ok(run: subprocess.CompletedProcess[str]) -> str:
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


@pytest.fixture
def registry_process(tmp_path: Path) -> Iterator[Any]:
    started = []

    def start() -> Any:
        server = start_server(
            "registry", "registry.cli",
            ["--network-dir", str(tmp_path / "reg" / NETWORK_DIR),
             "--db", str(tmp_path / "reg" / REGISTRY_DB),
             "--listen", "127.0.0.1:0", "--join-listen", "127.0.0.1:0"],
            tmp_path / "logs" / f"registry-{len(started)}",
        )  # fmt: skip
        started.append(server)
        server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()


def test_bootstrap_twice_changes_nothing(tmp_path: Path, registry_process: Any) -> None:
    reg, invites = tmp_path / "reg", tmp_path / "invites"
    nodes = {f"node-{i}": tmp_path / f"node-{i}" for i in (1, 2)}
    specs = ["--invite", "node-1:URA-90000001:Ziekenhuis Noord",
             "--invite", "node-2:URA-90000002:Apotheek: Centrum"]  # fmt: skip
    # The network first (the registry serves with it), then the invites with its real join port.
    first = ok(admin("bootstrap", "registry", "--data", reg, "--join-address", "127.0.0.1:1"))
    assert f"created in {reg / NETWORK_DIR}" in first
    registry = registry_process()
    join_address = str(registry.ready["join_address"])
    registry_args = ["bootstrap", "registry", "--data", reg, "--join-address", join_address,
                     "--invites-dir", invites, *specs]  # fmt: skip
    out = ok(admin(*registry_args))
    assert f"kept in {reg / NETWORK_DIR}" in out and out.count(": created ") == 2
    # Another node's invite is refused before the join uses it up: node-2 joins with it below.
    wrong = admin("bootstrap", "node", "--data", nodes["node-1"], "--token-file",
                  token_path(invites, "node-2"), "--node-id", "node-1")  # fmt: skip
    assert wrong.returncode == 2 and "for node node-2, not node-1" in wrong.stderr
    assert "still unused" in wrong.stderr and not any(nodes["node-1"].glob("*"))
    for node_id, folder in nodes.items():
        token = token_path(invites, node_id)
        out = ok(admin("bootstrap", "node", "--data", folder, "--token-file", token,
                       "--node-id", node_id))  # fmt: skip
        assert f"node {node_id} created in {folder}" in out
    assert (invites / "node-1.token").stat().st_mode & 0o777 == 0o600
    registry.stop()  # as a container restarts: the registry is down while bootstrap runs

    before = snapshot(reg, invites, *nodes.values())
    again = ok(admin(*registry_args))
    assert "kept in" in again and again.count(": kept ") == 2 and "joined at" in again
    again = ok(admin("bootstrap", "node", "--data", nodes["node-1"], "--token-file",
                     token_path(invites, "node-1"), "--node-id", "node-1"))  # fmt: skip
    assert "node node-1 kept" in again
    again = ok(admin("bootstrap", "node", "--data", nodes["node-2"]))  # no token needed now
    assert "node node-2 kept" in again
    assert snapshot(reg, invites, *nodes.values()) == before

    # A node of this network refuses a token from another network, and keeps everything.
    other = init_network(tmp_path / "other", "Other")
    foreign = tmp_path / "foreign.token"
    foreign.write_text(invite.encode(invite.new_token("127.0.0.1:1", other.ca_fingerprint, 0)))
    refused = admin("bootstrap", "node", "--data", nodes["node-1"], "--token-file", foreign)
    assert refused.returncode == 2 and "another network" in refused.stderr
    damaged = tmp_path / "damaged.token"
    damaged.write_text("tmi1.not-a-token.00000000")  # not needed once joined
    assert "node node-1 kept" in ok(
        admin("bootstrap", "node", "--data", nodes["node-1"], "--token-file", damaged)
    )
    assert snapshot(reg, invites, *nodes.values()) == before

    # And what bootstrap made serves: the registry again, then node-1 with its node.toml.
    registry = registry_process()
    node = start_server(
        "node-1", "node.cli", ["--config", str(nodes["node-1"] / NODE_CONFIG)],
        tmp_path / "logs" / "node-1",
    )  # fmt: skip
    try:
        node.wait_ready()
    finally:
        node.stop()


async def test_devnet_joins_through_bootstrap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """devnet's ``enrol`` calls ``tools.bootstrap.ensure_joined``: one first-start code path.

    A node joined by ``transmural-admin bootstrap node`` (as in a container)
    looks like devnet's: the same files, the same node.toml but for who it is.
    """
    assert tools.devnet.ensure_joined is tools.bootstrap.ensure_joined
    calls: list[Path] = []
    real = tools.bootstrap.ensure_joined

    async def spy(node_dir: Path, token: str | None, **settings: Any) -> Any:
        calls.append(node_dir)
        return await real(node_dir, token, **settings)

    monkeypatch.setattr(tools.devnet, "ensure_joined", spy)
    network = init_network(tmp_path / "network", "Devnet")
    (tmp_path / "registry").mkdir()
    server = RegistryServer(tmp_path / "registry" / REGISTRY_DB, network_dir=network.folder)
    await server.start()
    try:
        assert server.join_address is not None
        plan = SimpleNamespace(nodes=[SimpleNamespace(organisations=["Ziekenhuis Noord"])])
        net = tools.devnet.DevNet(tmp_path, plan, BSN_SYSTEM, insecure=False)
        net.registry = SimpleNamespace(
            address=server.address, ready={"join_address": server.join_address}
        )
        said: list[str] = []
        await tools.devnet.enrol(net, said.append)
        spec = InviteSpec("node-2", "URA-90000002", "Apotheek Centrum")
        await tools.bootstrap.write_invites(
            network.folder, net.registry_db, server.join_address, [spec], tmp_path / "invites"
        )
        process = await asyncio.create_subprocess_exec(
            *ADMIN, "bootstrap", "node", "--data", str(tmp_path / "node-2"),
            "--token-file", str(token_path(tmp_path / "invites", "node-2")),
            cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, umask=0o077,
        )  # fmt: skip
        out, err = await process.communicate()
        assert process.returncode == 0, out.decode() + err.decode()
    finally:
        await server.stop(0)
    assert calls == [tmp_path / "node-1"]
    assert said == ["node-1 joined as Ziekenhuis Noord (URA-90000001)"]
    devnet_node, container_node = tmp_path / "node-1", tmp_path / "node-2"
    names = sorted(p.name for p in devnet_node.iterdir() if not p.name.endswith(("-wal", "-shm")))
    assert names == sorted(
        p.name for p in container_node.iterdir() if not p.name.endswith(("-wal", "-shm"))
    )
    # node.db holds the join's audit record, the node's first.
    assert names == ["ca.crt", "network.key", "node.crt", "node.db", "node.key", NODE_CONFIG]
    for folder in (devnet_node, container_node):
        for private in ("node.key", "network.key", "node.db", NODE_CONFIG):
            assert (folder / private).stat().st_mode & 0o777 == 0o600
    # Who the node is differs; so does break_the_glass, which the demo network turns on.
    who = {"node_id", "organisation_id", "organisation_name", "break_the_glass"}
    devnet_config, container_config = (
        tomllib.loads((folder / NODE_CONFIG).read_text())
        for folder in (devnet_node, container_node)
    )
    assert devnet_config.keys() == container_config.keys()
    assert {k: v for k, v in devnet_config.items() if k not in who} == {
        k: v for k, v in container_config.items() if k not in who
    }
    assert container_config["node_id"] == "node-2"


# --- write_invites and ensure_joined on their own ---


async def test_invites_are_kept_renewed_when_expired_and_never_duplicated(tmp_path: Path) -> None:
    network = init_network(tmp_path / "network", "Test")
    db, out = tmp_path / "registry.db", tmp_path / "invites"
    clock = OffsetClock()
    specs = [InviteSpec("node-1", "URA-1", "One")]

    async def write() -> str:
        (outcome,) = await tools.bootstrap.write_invites(
            network.folder, db, "registry:7001", specs, out, clock
        )
        return outcome.action

    assert await write() == "created"
    token = (out / "node-1.token").read_text()
    assert invite.decode(token).registry == "registry:7001"
    assert await write() == "kept"
    clock.advance(invite.DEFAULT_TTL_S + 1)  # expired unused: a new invite replaces it
    assert await write() == "created"
    assert (out / "node-1.token").read_text() != token
    (out / "node-1.token").unlink()  # its invite is still open: no second one
    assert await write() == "none"
    assert not (out / "node-1.token").exists()


async def test_a_revoked_node_is_not_invited_again_until_invited_by_hand(
    tmp_path: Path,
) -> None:
    """compose runs bootstrap on every start: a new token would undo `transmural-admin revoke`."""
    network = init_network(tmp_path / "network", "Test")
    db, out = tmp_path / "registry.db", tmp_path / "invites"
    specs = [InviteSpec("node-1", "URA-1", "Huisarts Oost"), InviteSpec("node-2", "URA-2", "Two")]

    async def write() -> list[tuple[str, str]]:
        done = await tools.bootstrap.write_invites(network.folder, db, "registry:7001", specs, out)
        return [(outcome.action, outcome.detail) for outcome in done]

    assert [action for action, _ in await write()] == ["created", "created"]
    tokens = {n: invite.decode((out / f"{n}.token").read_text()) for n in ("node-1", "node-2")}
    store = await RegistryStore.open(db)
    try:  # node-2 joins (as the registry's Join records it)
        await store.redeem_invite(
            invite.secret_hash(tokens["node-2"].secret),
            CertificateRecord("0b", "node-2", "URA-2", time.time(), time.time() + 3600),
            time.time(),
        )
    finally:
        await store.close()
    await operator.revoke(db, "URA-1")  # node-1's open invite is closed
    await operator.revoke(db, "URA-2")  # node-2's certificate is revoked
    before = {path.name: path.read_text() for path in out.iterdir()}

    (one, one_detail), (two, two_detail) = await write()

    assert (one, two) == ("none", "none")
    assert {path.name: path.read_text() for path in out.iterdir()} == before
    said = r"node node-1 \(its certificate or its invite\) was revoked at 20\S+ and is not invited"
    assert re.match(said, one_detail)
    assert "node node-2 (its certificate or its invite) was revoked at" in two_detail
    hand = (
        f"invite it by hand: (umask 077; transmural-admin invite --network-dir {network.folder} "
        f"--db {db} --org-id URA-1 --org-name 'Huisarts Oost' --node-id node-1 "
        f"--registry registry:7001 > {out / 'node-1.token'})"
    )
    assert one_detail.endswith(hand)
    # The operator brings node-1 back by hand, as told: that invite is kept.
    token = await operator.invite(
        network.folder, db, "URA-1", "Huisarts Oost", "node-1", "registry:7001"
    )
    (out / "node-1.token").write_text(token + "\n")
    assert [action for action, _ in await write()] == ["kept", "none"]


async def test_a_lost_token_says_how_to_invite_the_node_again_now(tmp_path: Path) -> None:
    """Its invite open, the node could not join until it expired: up to days."""
    network = init_network(tmp_path / "network", "Test")
    db, out = tmp_path / "registry.db", tmp_path / "invites"
    spec, path = InviteSpec("node-1", "URA 1", "One"), out / "node-1.token"

    async def write() -> tools.bootstrap.InviteOutcome:
        (outcome,) = await tools.bootstrap.write_invites(
            network.folder, db, "registry:7001", [spec], out
        )
        return outcome

    assert (await write()).action == "created"
    path.unlink()
    lost = await write()

    assert lost.action == "none" and not path.exists()
    token_file, database, folder = (re.escape(str(p)) for p in (path, db, network.folder))
    assert re.fullmatch(
        rf"it has a pending invite, open until 20\S+, whose token file {token_file} is gone; "
        rf"to invite it again now, close that invite with transmural-admin revoke --db "
        rf"{database} --org-id 'URA 1' \(which revokes any certificate of URA 1 too\), then "
        rf"invite it by hand: \(umask 077; transmural-admin invite --network-dir {folder} "
        rf"--db {database} --org-id 'URA 1' --org-name One --node-id node-1 "
        rf"--registry registry:7001 > {token_file}\)",
        lost.detail,
    )
    # Doing as it says works, and the next start keeps the new token.
    assert await operator.revoke(db, "URA 1") == ([], 1)
    token = await operator.invite(network.folder, db, "URA 1", "One", "node-1", "registry:7001")
    path.write_text(token + "\n")
    assert (await write()).action == "kept"


async def test_an_open_invite_that_says_something_else_now_is_replaced(tmp_path: Path) -> None:
    """A corrected --join-address or organisation is not left in the old token."""
    network = init_network(tmp_path / "network", "Test")
    db, out = tmp_path / "registry.db", tmp_path / "invites"

    async def write(address: str, spec: InviteSpec) -> str:
        (outcome,) = await tools.bootstrap.write_invites(network.folder, db, address, [spec], out)
        return outcome.action

    first = InviteSpec("node-1", "URA-1", "One")
    assert await write("registry:7001", first) == "created"
    old = invite.decode((out / "node-1.token").read_text())
    assert await write("registry:7011", first) == "created"  # the address was wrong
    assert invite.decode((out / "node-1.token").read_text()).registry == "registry:7011"
    assert await write("registry:7011", InviteSpec("node-1", "URA-9", "Nine")) == "created"
    assert await write("registry:7011", InviteSpec("node-1", "URA-9", "Nine")) == "kept"
    store = await RegistryStore.open(db)
    try:  # the replaced invites no longer join, and a join with one is told why
        replaced = await store.get_invite(invite.secret_hash(old.secret))
        assert replaced is not None and replaced.expires_at <= time.time()
        with pytest.raises(PermissionDenied, match=r"withdrawn by the operator at .* UTC: a new"
                           " invite for node node-1 replaced it; use the new one"):  # fmt: skip
            await Membership(
                store, ca_cert=network.ca_cert, ca_key=network.ca_key,
                network_key=network.network_key,
            ).join(old.secret, b"")  # fmt: skip
    finally:
        await store.close()
    with pytest.raises(InvalidInput, match="node id node-1 is invited more than once"):
        await tools.bootstrap.write_invites(
            network.folder, db, "registry:7011", [first, InviteSpec("node-1", "URA-2", "Two")], out
        )


async def test_a_half_joined_folder_or_no_token_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no invite token"):
        await tools.bootstrap.ensure_joined(tmp_path / "fresh", None)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "node.key").write_text("")
    with pytest.raises(ConfigError, match="half-way"):
        await tools.bootstrap.ensure_joined(tmp_path / "half", None)


def test_invite_specs_are_checked() -> None:
    assert InviteSpec.parse("node-1:URA-1:A: B") == ("node-1", "URA-1", "A: B")
    for bad in ("node-1:URA-1", "Node 1:URA-1:A", "node-1::A"):
        with pytest.raises(InvalidInput):
            InviteSpec.parse(bad)


def test_joining_writes_the_nodes_first_audit_record(tmp_path: Path) -> None:
    """Flow 7: a join is audited at the node (the registry side logs the Join call)."""
    network = init_network(tmp_path / "network", "Audit")

    async def scenario() -> None:
        server = RegistryServer(tmp_path / "registry.db", network_dir=network.folder)
        await server.start()
        try:
            assert server.membership is not None and server.join_address
            token = await server.membership.create_invite(
                "URA-1", "Huisarts", "node-1", server.join_address
            )
            await tools.bootstrap.ensure_joined(tmp_path / "node-1", token)
        finally:
            await server.stop(0)

    asyncio.run(scenario())
    with sqlite3.connect(tmp_path / "node-1" / "node.db") as db:
        rows = db.execute("SELECT action, outcome, requesting_node FROM audit_log").fetchall()
    assert rows == [("join", "granted", "node-1")]


def test_a_bad_join_address_is_refused_before_anything_is_made(tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    refused = admin("bootstrap", "registry", "--data", reg, "--join-address", "registry:7301x")
    assert refused.returncode == 2
    assert "the join address 'registry:7301x' is not host:port" in refused.stderr
    assert not reg.exists()  # no network folder made with no registry able to use it
