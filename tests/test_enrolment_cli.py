"""The operator's and the facility's commands (flow 2), and joining through zeroconf.

Real processes: the registry and ``transmural-admin`` run as their console
scripts would, on loopback.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from registry.network import load_network
from transmural import invite

REPO = Path(__file__).resolve().parents[1]


# --- the operator's and the facility's commands ---


def admin(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tools.admin", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def one_line_error(result: subprocess.CompletedProcess[str], code: int, message: str) -> None:
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert message in lines[0]


def test_admin_init_invite_join_revoke(tmp_path: Path) -> None:
    net, db, ready = tmp_path / "net", tmp_path / "registry.db", tmp_path / "ready.json"
    created = admin("network", "init", "--dir", str(net), "--name", "Regio Oost")
    assert created.returncode == 0, created.stderr
    assert load_network(net).ca_fingerprint in created.stdout
    one_line_error(admin("network", "init", "--dir", str(net)), 2, "already holds a network")

    registry = subprocess.Popen(
        [sys.executable, "-m", "registry.cli", "serve", "--db", str(db),
         "--network-dir", str(net), "--ready-file", str(ready)],
        cwd=REPO, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():  # a file appearing has no event to wait on
            assert registry.poll() is None and time.monotonic() < deadline, "registry did not start"
            time.sleep(0.05)
        join_address = json.loads(ready.read_text())["join_address"]

        invited = admin(
            "invite", "--network-dir", str(net), "--db", str(db), "--org-id", "URA 1",
            "--org-name", "Huisartsen West", "--registry", join_address, "--ttl-hours", "2",
        )  # fmt: skip
        assert invited.returncode == 0, invited.stderr
        token = invited.stdout.strip()
        assert invited.stdout == token + "\n" and token.startswith("tmi2.")
        assert invite.decode(token).registry == join_address

        joined = admin("join", token, "--dir", str(tmp_path / "node"))
        assert joined.returncode == 0, joined.stderr
        assert "ura-1" in joined.stdout and "Huisartsen West (URA 1)" in joined.stdout
        assert json.loads(ready.read_text())["address"] in joined.stdout
        # No ports given: said plainly, since they change at every start.
        assert "note: listen = 127.0.0.1:0: the node takes a new port" in joined.stdout
        assert "note: gateway_listen = 127.0.0.1:0" in joined.stdout
        one_line_error(admin("join", token, "--dir", str(tmp_path / "again")), 2, "already used at")
        from_stdin = subprocess.run(  # "-": the token off the command line, where ps shows it
            [sys.executable, "-m", "tools.admin", "join", "-", "--dir", str(tmp_path / "again")],
            cwd=REPO, capture_output=True, text=True, timeout=60, input=token + "\n",
        )  # fmt: skip
        one_line_error(from_stdin, 2, "already used at")

        revoked = admin("revoke", "--db", str(db), "--org-id", "URA 1")
        assert revoked.returncode == 0, revoked.stderr
        assert "revoked 1 certificate of URA 1" in revoked.stdout
        assert revoked.stderr == ""  # said once, on stdout, not again as a log line
        one_line_error(admin("revoke", "--db", str(db), "--org-id", "URA 1"), 1, "already")
        one_line_error(
            admin("revoke", "--db", str(db), "--org-id", "URA 2"), 2, "has no certificates"
        )
    finally:
        registry.send_signal(signal.SIGTERM)
        registry.communicate(timeout=10)
    assert registry.returncode == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["invite", "--network-dir", "n", "--db", "d", "--org-id", "x"], "--org-name"),
        (
            ["invite", "--network-dir", "n", "--db", "d", "--org-id", "x", "--org-name", "y",
             "--ttl-hours", "0"],
            "--ttl-hours: must be a number of hours",
        ),
        (
            ["invite", "--network-dir", "nowhere", "--db", "d", "--org-id", "x", "--org-name", "y"],
            "there is no network folder nowhere",
        ),
        (["join", "tmi1.garbage.00000000", "--dir", "node"], "damaged"),
        (["join", "hello", "--dir", "node"], "not a Transmural invite token"),
        (["revoke", "--db", "missing.db", "--org-id", "x"], "there is no registry database"),
        (["rejoin", "hello", "--config", "nowhere.toml"], "cannot read node config nowhere.toml"),
        (["network", "init"], "--dir"),
    ],
)  # fmt: skip
def test_admin_membership_errors_are_one_line(
    args: list[str], message: str, tmp_path: Path
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tools.admin", *args],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    one_line_error(result, 2, message)
    assert not list(tmp_path.iterdir())


# --- finding the registry on the LAN ---

#: Run in a child process that moves into a network namespace of its own
#: (only ``lo``) before grpc starts a thread: grpc dials from its own
#: threads, which would otherwise stay in the host's namespace. No mDNS
#: packet can leave that namespace.
_LAN_JOIN = """
import asyncio, ctypes, sys
from pathlib import Path

if ctypes.CDLL(None, use_errno=True).unshare(0x40000000) != 0:
    sys.exit(77)
from tests.test_discovery import _bring_up_loopback
_bring_up_loopback()

from registry.network import init_network
from registry.server import RegistryServer
from tools.join import join


async def main(folder: Path) -> None:
    ours = init_network(folder / "ours", "Ours")
    theirs = init_network(folder / "theirs", "Theirs")
    servers = [
        RegistryServer(folder / f"{n.name}.db", network_dir=n.folder,
                       advertise_interfaces=["127.0.0.1"])
        for n in (theirs, ours)
    ]
    for server in servers:
        await server.start()
    try:
        token = await servers[1].membership.create_invite("URA 1", "GP", None, "")
        joined = await join(token, folder / "node", ["127.0.0.1"])
        print(joined.node_id, joined.registry_endpoint == servers[1].address)
    finally:
        for server in servers:
            await server.stop(0)


asyncio.run(main(Path(sys.argv[1])))
"""


def test_join_finds_its_registry_on_the_lan_and_ignores_another_network(
    tmp_path: Path,
) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _LAN_JOIN, str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if result.returncode == 77:
        pytest.skip("cannot create a network namespace (needs CAP_SYS_ADMIN)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ura-1", "True"]
