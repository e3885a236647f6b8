"""The reference input: every Synthea bundle loads, and search spans facilities.

Reads ../shared/data; fails (does not skip) when it is missing.
"""

from __future__ import annotations

import pytest

from tests.conftest import (
    NetworkFactory,
    assert_registry_holds_no_identity,
    collect,
    shared_data,
)
from transmural.identifiers import US_SSN_SYSTEM


@pytest.mark.parametrize("dataset", ["synthea-smart-r4", "synthea-hiv-r4"])
async def test_synthea_search_across_facilities(network: NetworkFactory, dataset: str) -> None:
    net = await network(n=3, national_system=US_SSN_SYSTEM)
    source = shared_data(dataset) / "bundles"
    plan = await net.load(source)
    await net.consent_all(True)

    every_patient = {p.patient_key for n in net.nodes for p in await n.store.patients()}
    assert every_patient, "no patients loaded"
    multi = sorted(f for f, p in plan.patients.items() if len(p.nodes) >= 2)
    assert multi, "spreading by service provider put nobody at two facilities"

    fhir_id = multi[0]
    ssn = next(v for s, v in plan.patients[fhir_id].identifiers if s == US_SSN_SYSTEM)
    holders, results = await collect(net.client(0), f"{US_SSN_SYSTEM}|{ssn}")

    expected = {f"node-{i + 1}" for i in plan.patients[fhir_id].nodes}
    assert set(holders.node_ids) == expected
    ok = [r for r in results.values() if r.status == "ok" and r.documents]
    assert len(ok) >= 2, results
    assert_registry_holds_no_identity(net.root / "registry.db", sorted(source.glob("*.json")))
