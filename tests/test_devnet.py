"""devnet and the demo, as a user runs them: separate processes on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import assert_registry_holds_no_identity

ADMIN = [sys.executable, "-m", "tools.admin"]
CLIENT = [sys.executable, "-m", "tools.clinician"]
REPO = Path(__file__).resolve().parents[1]


def test_demo_runs_and_exits_zero(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
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


def test_devnet_serves_clinician_search_json(tmp_path: Path) -> None:
    workdir = tmp_path / "net"
    devnet = subprocess.Popen(
        [*ADMIN, "devnet", "--nodes", "3", "--workdir", str(workdir)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        network_file = workdir / "network.json"
        deadline = time.monotonic() + 180
        while not network_file.exists():
            assert devnet.poll() is None, devnet.stdout.read() if devnet.stdout else ""
            assert time.monotonic() < deadline, "devnet did not come up"
            time.sleep(0.2)
        network = json.loads(network_file.read_text())
        node = network["nodes"][0]
        source_bundles = sorted((workdir / "source").glob("*.json"))
        patient = json.loads(source_bundles[0].read_text())["entry"][0]["resource"]
        bsn = next(i["value"] for i in patient["identifier"] if i["system"].endswith("bsn"))

        env = {**os.environ, "TRANSMURAL_NODE": node["client"]["TRANSMURAL_NODE"]}
        search = subprocess.run(
            [*CLIENT, "search", bsn, "--json"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert search.returncode == 0, search.stderr
        answer = json.loads(search.stdout)
        statuses = {f["node_id"]: f["status"] for f in answer["facilities"]}
        assert statuses, answer
        allowed = {"ok", "no-record", "consent-denied", "timeout", "unreachable", "error"}
        assert set(statuses.values()) <= allowed

        assert_registry_holds_no_identity(Path(network["registry"]["database"]), source_bundles)
    finally:
        devnet.send_signal(signal.SIGINT)
        devnet.wait(30)
    assert devnet.returncode == 0
