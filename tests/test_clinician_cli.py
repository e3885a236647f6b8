"""The ``transmural`` command as a clinician runs it, against a real network."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from tests.conftest import NetworkFactory, RunningNetwork
from tests.test_search import at_least, bsn_of
from transmural import pki


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
    assert "its certificate is not from your network's CA, or it is not node node-1" in err
    assert "running" not in err

    flags = signed_in(net)
    flags[7] = "node-9"
    code, _, err = await transmural(*flags, "report", "111222333")
    assert code == 3, err
    assert "its certificate is not from your network's CA, or it is not node node-9" in err
