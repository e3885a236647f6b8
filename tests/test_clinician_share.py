"""One clinician cannot take a node's every slot: a share per clinician, said plainly."""

from __future__ import annotations

import contextlib

import pytest

from node import const as node_const
from node.clinician_share import ClinicianShare
from node.users import Clinicians
from tests.conftest import NetworkFactory, collect, start_silent_peer, wait_for
from tests.test_search import at_least, bsn_of
from tools.gateway_client import ClientError, Holders
from transmural.errors import Overloaded
from transmural.identifiers import BSN_SYSTEM, canonical


def test_a_clinician_over_the_share_is_refused_and_others_are_not() -> None:
    share = ClinicianShare(limit=2)
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
