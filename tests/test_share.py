"""One caller cannot take a node's every slot: a share per clinician and per facility."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
from pathlib import Path
from typing import Any

import pytest

from node import const as node_const
from node.ingest import ingest_file
from node.share import clinician_share, facility_share
from node.users import Clinicians
from tests.conftest import NetworkFactory, RunningNetwork, collect, start_silent_peer, wait_for
from tests.test_ingest import bundle_of, dutch_patient, note
from tests.test_search import at_least, bsn_of
from tools.gateway_client import ClientError, GatewayClient, Holders
from transmural.errors import Overloaded
from transmural.identifiers import BSN_SYSTEM, canonical
from transmural.v1 import common_pb2, gateway_pb2


def test_a_clinician_over_the_share_is_refused_and_others_are_not() -> None:
    share = clinician_share(limit=2)
    with share.request("ann"), share.request("ann"):
        with (
            pytest.raises(Overloaded, match="already have 2 requests running"),
            share.request("ann"),
        ):
            pass
        with share.request("bob"):
            assert share.running("bob") == 1
        assert share.running("ann") == 2
    assert share.running("ann") == 0
    with share.request("ann"):  # places come back, also after an error inside
        pass
    with contextlib.suppress(ValueError), share.request("ann"):
        raise ValueError
    assert share.running("ann") == 0


async def test_searches_over_a_clinicians_share_are_refused_at_once(
    network: NetworkFactory, synthetic_bundles, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(node_const, "MAX_REQUESTS_PER_CLINICIAN", 2)
    net = await network(n=2)
    plan = await net.load(synthetic_bundles)
    await net.consent_all(True)
    bsn = bsn_of(plan, at_least(plan, 1)[0])
    pseudonym = net.pseudonymiser.pseudonym(canonical(BSN_SYSTEM, bsn))
    hung = await start_silent_peer(net, "FindDocuments", pseudonym)
    other = await Clinicians(net.nodes[0].store).add("dr.other", "Dr. Other", "physician")
    client = net.client(0)
    # Two searches held open by the facility that never answers.
    running = [client.search(bsn, deadline_ms=20_000) for _ in range(2)]
    try:
        for search in running:
            assert isinstance(await anext(search), Holders)
        with pytest.raises(ClientError, match="already have 2 requests running") as caught:
            await collect(client, bsn)
        assert caught.value.exit_code == 3
        _, results = await collect(net.client(0, token=other), bsn, deadline_ms=300)
        assert results["hung"].status == "timeout"  # another clinician is still served
    finally:
        for search in running:
            await search.aclose()
        await hung.stop(0)

    async def served_again() -> bool:
        try:
            await collect(client, bsn, deadline_ms=300)
        except ClientError:
            return False
        return True

    await wait_for(served_again)  # the places came back when the searches ended


def test_a_facility_over_its_share_is_refused_saying_so() -> None:
    share = facility_share(limit=1)
    with share.request("node-1"):
        with (
            pytest.raises(Overloaded, match="is already answering 1 call from yours"),
            share.request("node-1"),
        ):
            pass
        with share.request("node-2"):
            assert share.running("node-2") == 1


async def store_large_document(
    net: RunningNetwork, node: int, tmp_path: Path, size: int, bsn: str = "111222333"
) -> tuple[bytes, str]:
    """A document of ``size`` random bytes at node ``node``, consent given everywhere;
    returns its content and its document id as searches list it."""
    content = os.urandom(size)
    bundle = tmp_path / "large.json"
    bundle.write_text(json.dumps(bundle_of(
        dutch_patient("big", bsn), note("scan", "big", base64.b64encode(content).decode())
    )))  # fmt: skip
    await ingest_file(net.nodes[node].store, bundle, net.pseudonymiser, BSN_SYSTEM)
    await net.consent_all(True)
    node_id = net.nodes[node].config.node_id
    _, results = await collect(net.client(0), bsn)
    listed = next(d for d in results[node_id].documents if d.size == size)
    return content, listed.document_id


def held_fetch(client: GatewayClient, bsn: str, node_id: str, document_id: str) -> Any:
    """A raw fetch call, so that a test can read a piece and then stop reading."""
    request = gateway_pb2.GatewayFetchRequest(
        patient=common_pb2.PatientIdentifier(system=BSN_SYSTEM, value=bsn),
        node_id=node_id, document_id=document_id, purpose_of_use="treatment",
    )  # fmt: skip
    return client._stub.FetchDocument(request, metadata=client._metadata)


async def test_one_facility_cannot_take_every_slot_at_another(
    network: NetworkFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(node_const, "MAX_CALLS_PER_FACILITY", 2)
    net = await network(n=3)
    size = 24 * 1024 * 1024  # far more than the flow-control windows hold
    content, document_id = await store_large_document(net, 1, tmp_path, size)
    # node-1's gateway holds two fetches from node-2 open: its clinicians stopped reading.
    held = [held_fetch(net.client(0), "111222333", "node-2", document_id) for _ in range(2)]
    try:
        for call in held:
            assert (await call.read()).data
        with pytest.raises(
            ClientError, match="node-2: busy: this facility is already answering 2 calls from yours"
        ):
            await net.client(0).fetch("111222333", "node-2", document_id, io.BytesIO())
        _, results = await collect(net.client(0), "111222333")
        assert results["node-2"].status == "error"
        assert results["node-2"].message.startswith(
            "busy: this facility is already answering 2 calls from yours"
        )
        # Another facility is served in full meanwhile.
        out = io.BytesIO()
        await net.client(2).fetch("111222333", "node-2", document_id, out)
        assert out.getvalue() == content
    finally:
        for call in held:
            call.cancel()

    async def served_again() -> bool:
        _, answers = await collect(net.client(0), "111222333")
        return answers["node-2"].status == "ok"

    await wait_for(served_again)  # the places came back when the fetches ended
