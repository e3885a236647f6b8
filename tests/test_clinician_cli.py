"""The ``transmural`` command as a clinician runs it, against a real network."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from tests.conftest import NetworkFactory, RunningNetwork
from tests.test_search import at_least, bsn_of


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


async def test_search_json_with_options_after_the_command(
    network: NetworkFactory, synthetic_bundles: Path
) -> None:
    net, bsn = await loaded(network, synthetic_bundles)
    code, out, err = await transmural("search", bsn, "--json", "--node", net.nodes[0].address)
    assert code == 0, err
    answer = json.loads(out)
    assert len(answer["facilities"]) >= 2
    assert {f["status"] for f in answer["facilities"]} == {"ok"}


async def test_registry_down_is_not_blamed_on_your_node(
    network: NetworkFactory, synthetic_bundles: Path
) -> None:
    net, bsn = await loaded(network, synthetic_bundles)
    await net.registry.stop(0)
    code, _, err = await transmural("--node", net.nodes[0].address, "search", bsn)
    assert code == 1
    assert "registry" in err and "cannot reach your node" not in err


async def test_node_not_running_exit_3(network: NetworkFactory) -> None:
    code, _, err = await transmural("--node", "127.0.0.1:1", "search", "111222333")
    assert code == 3
    assert "cannot reach your node at 127.0.0.1:1" in err


async def test_fetch_to_stdout_and_to_missing_folder(
    network: NetworkFactory, synthetic_bundles: Path, tmp_path: Path
) -> None:
    net, bsn = await loaded(network, synthetic_bundles)
    node = net.nodes[0].address
    code, out, _ = await transmural("--node", node, "search", bsn, "--json")
    facility = json.loads(out)["facilities"][0]
    document = facility["documents"][0]
    fetch = ["--node", node, "fetch", bsn, "--facility", facility["node_id"],
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
    assert not (tmp_path / "note.txt.part").exists()


async def test_bad_input_exit_2(network: NetworkFactory) -> None:
    net = await network(n=1)
    node = net.nodes[0].address
    for args, says in [
        (["search", "111222333", "--deadline-ms", "-5"], "0 to"),
        (["search", "|111222333"], "empty system"),
        (["search", "111222334"], "11-check"),
    ]:
        code, _, err = await transmural("--node", node, *args)
        assert code == 2, (args, err)
        assert says in err, (args, err)
        assert "Traceback" not in err
