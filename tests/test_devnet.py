"""devnet and the demo, as a user runs them: separate processes on loopback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.conftest import assert_registry_holds_no_identity, shared_data

ADMIN = [sys.executable, "-m", "tools.admin"]
CLIENT = [sys.executable, "-m", "tools.clinician"]
REPO = Path(__file__).resolve().parents[1]
#: Starts a registry as devnet does, behind a prefix, says its pid, and waits to be killed.
SUPERVISOR = """
import sys, time
from pathlib import Path
from tools.supervise import start_server
folder = Path(sys.argv[1])
server = start_server(
    "registry", "registry.cli",
    ["--db", str(folder / "registry.db"), "--listen", "127.0.0.1:0",
     "--join-listen", "127.0.0.1:0", "--insecure-dev"],
    folder, prefix=["env", "TRANSMURAL_PREFIXED=yes"],
)
server.wait_ready()
print(server.process.pid, flush=True)
time.sleep(60)
"""


def start_devnet(workdir: Path, nodes: int = 3) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*ADMIN, "devnet", "--nodes", str(nodes), "--workdir", str(workdir)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_network(devnet: subprocess.Popen[str], workdir: Path) -> dict[str, Any]:
    """network.json once devnet is up (it is written when everything serves)."""
    network_file = workdir / "network.json"
    deadline = time.monotonic() + 180
    while not network_file.exists():
        if devnet.poll() is not None:
            out, err = devnet.communicate()
            raise AssertionError(f"devnet exited {devnet.returncode}:\n{out}\n{err}")
        assert time.monotonic() < deadline, "devnet did not come up"
        time.sleep(0.2)
    network: dict[str, Any] = json.loads(network_file.read_text())
    return network


def readable_by_others(root: Path) -> list[str]:
    """Every path under ``root`` (itself included) with any group or other bit."""
    found = []
    for path in [root, *root.rglob("*")]:
        if path.lstat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            found.append(f"{oct(path.lstat().st_mode & 0o777)} {path}")
    return found


def test_demo_runs_and_exits_zero(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    workdir.mkdir()
    workdir.chmod(0o755)  # as a user's own folder often is
    run = subprocess.run(
        [*ADMIN, "devnet", "--nodes", "3", "--demo", "--workdir", str(workdir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "consent-denied" in run.stdout
    assert "SHA-256 verified" in run.stdout
    assert "11-check" in run.stdout
    network = json.loads((workdir / "network.json").read_text())
    assert len(network["nodes"]) == 3
    for node in network["nodes"]:
        assert Path(node["database"]).is_file() and Path(node["log"]).is_file()
    assert readable_by_others(workdir) == []


def test_one_node_demo_on_us_ssn_data(tmp_path: Path) -> None:
    """One node cannot span facilities; documents suffice. SSN data gets its own bad id."""
    source = shared_data("synthea-smart-r4") / "bundles"
    data = tmp_path / "data"
    data.mkdir()
    for name in ("Buster_Hoeger_ad2e3fc5-2b5d-4cb9-8d03-9ea0f4ac8423.json",):
        shutil.copyfile(source / name, data / name)
    run = subprocess.run(
        [*ADMIN, "devnet", "--nodes", "1", "--demo", "--data", str(data)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "SHA-256 verified" in run.stdout
    assert "$ transmural search 999-12-345" in run.stdout
    assert "a US SSN has 9 digits" in run.stdout


def test_devnet_serves_clinician_search_json(tmp_path: Path) -> None:
    workdir = tmp_path / "net"
    devnet = start_devnet(workdir)
    try:
        network = wait_for_network(devnet, workdir)
        node = network["nodes"][0]
        source_bundles = sorted((workdir / "source").glob("*.json"))
        env = {**os.environ, "TRANSMURAL_CONFIG": node["client"]["TRANSMURAL_CONFIG"]}
        # Some patients consented nowhere (opt-in): take the first the network lists.
        for bundle in source_bundles:
            patient = json.loads(bundle.read_text())["entry"][0]["resource"]
            bsn = next(i["value"] for i in patient["identifier"] if i["system"].endswith("bsn"))
            search = subprocess.run(
                [*CLIENT, "search", bsn, "--json"],
                cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            if search.returncode == 0:
                break
        assert search.returncode == 0, search.stderr
        answer = json.loads(search.stdout)
        statuses = {f["node_id"]: f["status"] for f in answer["facilities"]}
        assert statuses, answer
        allowed = {"ok", "no-record", "consent-denied", "timeout", "unreachable", "error"}
        assert set(statuses.values()) <= allowed

        # The same node, without the CA: refused (exit 3), not answered in plain text.
        plain = subprocess.run(
            [*CLIENT, "--insecure-dev", "--node", node["gateway_address"], "--token", "x",
             "search", bsn],
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert plain.returncode == 3, plain.stderr

        registry = network["registry"]
        assert_registry_holds_no_identity(Path(registry["database"]), source_bundles)
    finally:
        devnet.send_signal(signal.SIGINT)
        out, err = devnet.communicate(timeout=30)
    assert devnet.returncode == 0, err
    script = Path(sys.executable).parent / "transmural"
    assert f"Try:  {script} --config {node['client']['TRANSMURAL_CONFIG']} search" in out
    assert str(workdir / "network.json") in out


def test_devnet_exits_when_a_server_dies(tmp_path: Path) -> None:
    workdir = tmp_path / "net"
    devnet = start_devnet(workdir, nodes=1)
    try:
        wait_for_network(devnet, workdir)
        # A SIGKILLed server leaves its ready file behind, with its pid.
        ready = json.loads((workdir / "registry" / "ready.json").read_text())
        os.kill(ready["pid"], signal.SIGKILL)
        out, err = devnet.communicate(timeout=10)
    finally:
        if devnet.poll() is None:
            devnet.send_signal(signal.SIGINT)
            devnet.communicate(timeout=30)
    assert devnet.returncode == 1, out + err
    assert "registry exited with code -9 (SIGKILL); its log: " in err
    assert str(workdir / "registry" / "server.log") in err
    assert "stopping the network: node-1 (" in err, err
    # The node was stopped gracefully: a clean stop removes its ready file.
    assert not (workdir / "node-1" / "ready.json").exists()


def test_a_node_that_dies_leaves_the_rest_running(tmp_path: Path) -> None:
    """Kill node-2: devnet reports it and keeps serving; node-1 sees it unreachable."""
    workdir = tmp_path / "net"
    devnet = start_devnet(workdir)
    try:
        network = wait_for_network(devnet, workdir)
        node2 = json.loads((workdir / "node-2" / "ready.json").read_text())
        os.kill(node2["pid"], signal.SIGKILL)
        time.sleep(2.5)  # past devnet's once-a-second watch
        assert devnet.poll() is None, "devnet must keep the rest of the network running"
        env = {
            **os.environ,
            "TRANSMURAL_CONFIG": network["nodes"][0]["client"]["TRANSMURAL_CONFIG"],
        }
        statuses: dict[str, str] = {}
        for bundle in sorted((workdir / "node-2" / "bundles").glob("*.json"))[:12]:
            resource = json.loads(bundle.read_text())["entry"][0]["resource"]
            if resource.get("resourceType") != "Patient":
                continue
            bsn = next(i["value"] for i in resource["identifier"] if i["system"].endswith("bsn"))
            search = subprocess.run(
                [*CLIENT, "search", bsn, "--json"],
                cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            if search.returncode == 0:
                answer = json.loads(search.stdout)
                statuses = {f["node_id"]: f["status"] for f in answer["facilities"]}
                if "node-2" in statuses:
                    break
        assert statuses.get("node-2") == "unreachable", statuses
    finally:
        devnet.send_signal(signal.SIGINT)
        _, err = devnet.communicate(timeout=30)
    assert devnet.returncode == 0
    assert "node-2 exited" in err and "keeps running" in err


def _running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (an orphan may wait to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def test_a_killed_supervisor_leaves_no_server_behind(tmp_path: Path) -> None:
    """SIGKILL devnet (or bench, or pytest): its servers get SIGTERM from the kernel.

    Also: ``start_server``'s prefix runs first and execs the server (the WAN
    test's ``ip netns exec``): the process it watches is the server itself.
    """
    supervisor = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR, str(tmp_path)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert supervisor.stdout is not None
        line = supervisor.stdout.readline()
        environment = Path(f"/proc/{line.strip()}/environ").read_bytes() if line else b""
    finally:
        supervisor.kill()
        _, err = supervisor.communicate(timeout=30)
    assert line.strip().isdigit(), err
    pid = int(line)
    assert json.loads((tmp_path / "ready.json").read_text())["pid"] == pid
    assert b"TRANSMURAL_PREFIXED=yes" in environment.split(b"\0")
    deadline = time.monotonic() + 15
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _running(pid):
        os.kill(pid, signal.SIGKILL)
        raise AssertionError("the server outlived the process that started it")


def test_a_workdir_holding_something_else_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    workdir = tmp_path / "home"
    workdir.mkdir(mode=0o755)
    (workdir / "notes.txt").write_text("mine")
    workdir.chmod(0o755)
    run = subprocess.run(
        [*ADMIN, "devnet", "--nodes", "1", "--workdir", str(workdir)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 2
    assert "not an empty folder" in run.stderr
    assert sorted(p.name for p in workdir.iterdir()) == ["notes.txt"]
    assert workdir.stat().st_mode & 0o777 == 0o755
