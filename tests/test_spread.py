"""Spreading Synthea bundles over facility nodes, checked against the real data.

The smart set (100 MB) is spread once per module and read back once; each
test then asserts one property of that result.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tools.spread import PROVIDER_TYPES, PatientSpread, SpreadPlan, national_system, spread
from transmural.errors import InvalidBundle, InvalidInput
from transmural.identifiers import BSN_SYSTEM, US_SSN_SYSTEM

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SMART = DATA / "synthea-smart-r4" / "bundles"
HIV = DATA / "synthea-hiv-r4" / "bundles"
SYNTHEA_ORG = "https://github.com/synthetichealth/synthea"

Json = dict[str, Any]


def require(folder: Path) -> Path:
    """The data folder, or a failure (not a skip): these tests are the proof on real data."""
    assert folder.is_dir(), f"test data missing: {folder}"
    return folder


def load(path: Path) -> Json:
    bundle: Json = json.loads(path.read_bytes())
    return bundle


def encounter_refs(resource: Json) -> list[str]:
    """The encounter references the spread must keep a resource with (test's own reading)."""
    found = [resource.get("encounter")]
    found += (resource.get("context") or {}).get("encounter") or []
    for item in resource.get("item") or []:
        found += item.get("encounter") or []
    return [r["reference"] for r in found if isinstance(r, dict) and "reference" in r]


@dataclass
class Readback:
    """What the test learns by reading the source and every node's output once."""

    plan: SpreadPlan
    targets: list[Path]
    source_types: dict[str, str] = field(default_factory=dict)
    source_encounters: set[str] = field(default_factory=set)
    encounter_nodes: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    problems: list[str] = field(default_factory=list)


def read_back(source: Path, plan: SpreadPlan, targets: list[Path]) -> Readback:
    seen = Readback(plan, targets)
    outputs = {p.name for t in targets for p in t.iterdir()}
    sources = sorted(source.glob("*.json"))
    if outputs != {p.name for p in sources}:
        seen.problems.append(f"output names differ: {sorted(outputs ^ {p.name for p in sources})}")
    for path in sources:
        original = load(path)
        seen.source_types[path.name] = original["type"]
        is_patient = any(e["resource"]["resourceType"] == "Patient" for e in original["entry"])
        by_url = {e["fullUrl"]: e for e in original["entry"]}
        for url, entry in by_url.items():
            if entry["resource"]["resourceType"] == "Encounter":
                seen.source_encounters.add(url)
        for node, target in enumerate(targets):
            out = target / path.name
            if not out.exists():
                continue
            if not is_patient:
                if out.read_bytes() != path.read_bytes():
                    seen.problems.append(f"{out}: provider bundle changed")
                continue
            part = load(out)
            if part.get("resourceType") != "Bundle" or part.get("type") != original["type"]:
                seen.problems.append(f"{out}: not a {original['type']} Bundle")
            if {k: v for k, v in part.items() if k != "entry"} != {
                k: v for k, v in original.items() if k != "entry"
            }:
                seen.problems.append(f"{out}: bundle fields other than entry changed")
            urls = [e["fullUrl"] for e in part["entry"]]
            if len(urls) != len(set(urls)):
                seen.problems.append(f"{out}: duplicate fullUrls")
            for entry in part["entry"]:
                if by_url.get(entry["fullUrl"]) != entry:
                    seen.problems.append(f"{out}: entry {entry['fullUrl']} differs from source")
                resource = entry["resource"]
                if resource["resourceType"] == "Encounter":
                    seen.encounter_nodes[entry["fullUrl"]].append(node)
                for ref in encounter_refs(resource):
                    if ref in by_url and ref not in urls:
                        seen.problems.append(f"{out}: {entry['fullUrl']} left its encounter")
            shared = {
                u
                for u, e in by_url.items()
                if e["resource"]["resourceType"] in PROVIDER_TYPES | {"Patient"}
            }
            if not shared <= set(urls):
                seen.problems.append(f"{out}: lacks the patient or the bundle's providers")
    return seen


@pytest.fixture(scope="module")
def smart(tmp_path_factory: pytest.TempPathFactory) -> Readback:
    source = require(SMART)
    root = tmp_path_factory.mktemp("smart")
    targets = [root / f"node-{i}" for i in range(3)]
    plan = spread(source, targets)
    return read_back(source, plan, targets)


def test_every_output_is_an_unchanged_part_of_its_source(smart: Readback) -> None:
    assert smart.problems == []
    assert set(smart.source_types.values()) == {"transaction"}


def test_every_encounter_lands_at_exactly_one_node(smart: Readback) -> None:
    assert set(smart.encounter_nodes) == smart.source_encounters
    assert all(len(nodes) == 1 for nodes in smart.encounter_nodes.values())
    assert len(smart.source_encounters) == 2708
    assert sum(share.encounters for share in smart.plan.nodes) == 2708


def test_each_organisation_belongs_to_one_node_and_nodes_are_balanced(smart: Readback) -> None:
    keys = [key for share in smart.plan.nodes for key in share.organisation_keys]
    assert len(keys) == len(set(keys)) >= 64
    assert all(key.startswith(f"{SYNTHEA_ORG}|") for key in keys)
    loads = [share.encounters for share in smart.plan.nodes]
    assert max(loads) - min(loads) < 0.2 * max(loads)
    assert smart.plan.nodes[0].organisations[0] == "HOLYOKE MEDICAL CENTER"


def test_patients_are_spread_over_one_or_several_nodes(smart: Readback) -> None:
    plan = smart.plan
    assert len(plan.patients) == 90
    at = Counter(len(p.nodes) for p in plan.patients.values())
    assert at[1] > 0
    assert at[2] + at[3] >= 20
    for patient in plan.patients.values():
        assert patient.home in patient.nodes
        assert patient.nodes == sorted(set(patient.nodes))
        assert all((smart.targets[n] / patient.file).exists() for n in patient.nodes)
    assert sum(share.patients for share in plan.nodes) == sum(at[k] * k for k in at)


def test_plan_carries_patient_identifiers_and_the_national_system(smart: Readback) -> None:
    for patient in smart.plan.patients.values():
        systems = {system for system, _ in patient.identifiers}
        assert US_SSN_SYSTEM in systems
    assert national_system(smart.plan) == US_SSN_SYSTEM


def test_spread_is_deterministic(smart: Readback, tmp_path: Path) -> None:
    targets = [tmp_path / f"again-{i}" for i in range(3)]
    assert spread(SMART, targets) == smart.plan
    for first, second in zip(smart.targets, targets, strict=True):
        names = sorted(p.name for p in first.iterdir())
        assert names == sorted(p.name for p in second.iterdir())
        assert all((first / n).read_bytes() == (second / n).read_bytes() for n in names)


def test_hiv_set_with_conditional_references_spreads(tmp_path: Path) -> None:
    source = require(HIV)
    targets = [tmp_path / f"node-{i}" for i in range(3)]
    plan = spread(source, targets)
    seen = read_back(source, plan, targets)
    assert seen.problems == []
    assert len(seen.source_encounters) == 880
    assert set(seen.encounter_nodes) == seen.source_encounters
    assert all(len(nodes) == 1 for nodes in seen.encounter_nodes.values())
    assert sorted(set(seen.source_types.values())) == ["batch", "transaction"]
    # Each encounter sits at the node its conditionally referenced organisation went to.
    org_node = {k: n for n, share in enumerate(plan.nodes) for k in share.organisation_keys}
    for path in targets[0].parent.glob("node-*/*.json"):
        node = int(path.parent.name.removeprefix("node-"))
        for entry in load(path)["entry"]:
            resource = entry["resource"]
            if resource["resourceType"] == "Encounter":
                ref = resource["serviceProvider"]["reference"]
                assert org_node[ref.removeprefix("Organization?identifier=")] == node
    assert any(len(p.nodes) >= 2 for p in plan.patients.values())
    assert plan.nodes[0].organisations[0] != plan.nodes[0].organisation_keys[0]  # named


def bundle(*entries: Json) -> Json:
    return {"resourceType": "Bundle", "type": "transaction", "entry": list(entries)}


def entry(resource_type: str, rid: str, **fields: Any) -> Json:
    return {
        "fullUrl": f"urn:uuid:{rid}",
        "resource": {"resourceType": resource_type, "id": rid, **fields},
        "request": {"method": "POST", "url": resource_type},
    }


def org(rid: str) -> Json:
    return entry("Organization", rid, identifier=[{"system": "urn:test", "value": rid}], name=rid)


def visit(rid: str, provider: str) -> Json:
    return entry("Encounter", rid, serviceProvider={"reference": provider})


def test_unresolvable_provider_and_unlinked_resources_go_home(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    first = bundle(
        entry("Patient", "p1", identifier=[{"system": BSN_SYSTEM, "value": "999990019"}]),
        org("big"),
        visit("e0", "urn:uuid:big"),
        visit("e1", "urn:uuid:big"),
        visit("e2", "urn:uuid:big"),
        visit("e3", "urn:uuid:nowhere"),
        entry("Observation", "o3", encounter={"reference": "urn:uuid:e3"}),
        entry("Goal", "g1"),
        entry("Observation", "o4", encounter={"reference": "urn:uuid:e4"}),
        visit("e4", "Organization?identifier=urn:test|small"),
    )
    second = bundle(entry("Patient", "p2"), org("small"), visit("e5", "urn:uuid:small"))
    (source / "a.json").write_text(json.dumps(first))
    (source / "b.json").write_text(json.dumps(second))
    targets = [tmp_path / "n0", tmp_path / "n1"]
    plan = spread(source, targets)
    assert plan.nodes[0].organisation_keys == ["urn:test|big"]
    assert plan.nodes[1].organisation_keys == ["urn:test|small"]
    assert plan.patients["p1"].nodes == [0, 1]
    assert plan.patients["p1"].home == 0
    assert national_system(plan) == BSN_SYSTEM
    home = {e["fullUrl"] for e in load(targets[0] / "a.json")["entry"]}
    away = {e["fullUrl"] for e in load(targets[1] / "a.json")["entry"]}
    assert {"urn:uuid:e3", "urn:uuid:o3", "urn:uuid:g1"} <= home
    assert away == {"urn:uuid:p1", "urn:uuid:big", "urn:uuid:e4", "urn:uuid:o4"}


def test_a_patient_in_two_files_is_one_patient_at_both_nodes(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    first = bundle(
        entry("Patient", "p1"), org("x"), visit("e1", "urn:uuid:x"), visit("e2", "urn:uuid:x")
    )
    later = bundle(entry("Patient", "p1"), org("y"), visit("e3", "urn:uuid:y"))
    (source / "a.json").write_text(json.dumps(first))
    (source / "b.json").write_text(json.dumps(later))
    plan = spread(source, [tmp_path / "n0", tmp_path / "n1"])
    assert list(plan.patients) == ["p1"]
    assert plan.patients["p1"].nodes == [0, 1]
    assert plan.patients["p1"].file == "a.json"
    assert [share.patients for share in plan.nodes] == [1, 1]


def test_national_system_knows_the_bsn_oid() -> None:
    oid = "urn:oid:2.16.840.1.113883.2.4.6.3"
    patient = PatientSpread(nodes=[0], home=0, identifiers=[(oid, "999990019")], file="x.json")
    assert national_system(SpreadPlan(nodes=[], patients={"x": patient})) == BSN_SYSTEM
    assert national_system(SpreadPlan(nodes=[], patients={})) == US_SSN_SYSTEM


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", "not a JSON file"),
        (b"\xff\xfe", "not a JSON file"),
        (b'{"resourceType": "Patient"}', "not a FHIR Bundle"),
        (b"[1, 2]", "not a FHIR Bundle"),
        (b'{"resourceType": "Bundle", "type": "batch", "entry": {}}', "entry must be a list"),
    ],
)
def test_a_file_that_is_not_a_bundle_is_named_in_the_error(
    tmp_path: Path, content: bytes, message: str
) -> None:
    source = tmp_path / "source"
    source.mkdir()
    (source / "broken.json").write_bytes(content)
    with pytest.raises(InvalidBundle, match=message) as caught:
        spread(source, [tmp_path / "n0"])
    assert "broken.json" in str(caught.value)


def test_no_bundles_or_no_targets_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r"no \*\.json bundles"):
        spread(tmp_path, [tmp_path / "n0"])
    with pytest.raises(InvalidInput, match="at least one target"):
        spread(tmp_path, [])
