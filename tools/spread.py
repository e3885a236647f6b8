"""Spread patients' records over facility nodes the way real care spreads.

Synthea writes one bundle per patient with every encounter the patient ever
had, at whatever organisation. A record-locator network only shows anything
when one patient's data sits at several facilities, each holding what
happened *there*. So each organisation is given to one node, each encounter
(and everything recorded during it) follows its ``serviceProvider``, and
what belongs to no encounter (allergies, goals, provenance) stays at the
patient's home node: the one that saw them most.

Two passes, one bundle in memory at a time: pass 1 counts encounters per
organisation so the organisations can be balanced over the nodes; pass 2
splits each bundle and writes its parts. Entries are written unchanged
(same ``fullUrl``, ``request`` and references): references into another
node's part dangle, which the ingester tolerates, exactly as a real
facility's record points at care given elsewhere.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from transmural.errors import InvalidBundle, InvalidIdentifier, InvalidInput
from transmural.identifiers import BSN_SYSTEM, US_SSN_SYSTEM, canonical_system
from transmural.process import given_path

#: Resource types a patient bundle repeats for the providers it mentions;
#: every node part of the bundle keeps them so its references still resolve.
PROVIDER_TYPES = frozenset({"Organization", "Practitioner", "Location", "PractitionerRole"})

Json = dict[str, Any]


@dataclass(slots=True)
class NodeShare:
    """What one node received: its organisations (largest first) and counts."""

    #: Names of the organisations given to this node, largest first: the
    #: first names the facility.
    organisations: list[str] = field(default_factory=list)
    #: Their identifier tokens ``system|value``, in the same order.
    organisation_keys: list[str] = field(default_factory=list)
    patients: int = 0
    encounters: int = 0
    #: Entries written into this node's patient bundles (the copied
    #: provider bundles are not counted: every node has the same ones).
    resources: int = 0


@dataclass(frozen=True, slots=True)
class PatientSpread:
    """Where one patient's data went, and who they are (for picking a demo patient)."""

    nodes: list[int]
    home: int
    identifiers: list[tuple[str, str]]
    file: str


@dataclass(slots=True)
class SpreadPlan:
    """Per node what it holds; per patient (by FHIR id) which nodes hold them."""

    nodes: list[NodeShare]
    patients: dict[str, PatientSpread]


@dataclass(slots=True)
class _Survey:
    """Pass 1: organisation names and weights, and which files are patient bundles."""

    names: dict[str, str] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    encounters: Counter[str] = field(default_factory=Counter)
    patients: Counter[str] = field(default_factory=Counter)
    patient_files: set[str] = field(default_factory=set)

    def canon(self, raw: str) -> str:
        return self.aliases.get(raw, raw)


def spread(source: Path, targets: list[Path]) -> SpreadPlan:
    """Write one folder of bundles per target node; say who went where.

    Deterministic: the same source and number of targets always give the
    same plan and the same files.
    """
    if not targets:
        raise InvalidInput("spread needs at least one target folder")
    files = bundle_files(source)
    survey = _Survey()
    for path in files:
        _survey_bundle(path, _read_bundle(path), survey)
    org_node, plan = _assign(survey, len(targets))
    for target in targets:
        target.mkdir(parents=True, exist_ok=True)
    for path in files:
        if path.name not in survey.patient_files:
            for target in targets:
                shutil.copyfile(path, target / path.name)
            continue
        _split_bundle(path, _read_bundle(path), survey, org_node, targets, plan)
    for patient in plan.patients.values():
        for node in patient.nodes:
            plan.nodes[node].patients += 1
    return plan


def national_system(plan: SpreadPlan) -> str:
    """The national identifier system the data carries: BSN if any patient has one, else US SSN."""
    for patient in plan.patients.values():
        for system, _ in patient.identifiers:
            try:
                if canonical_system(system) == BSN_SYSTEM:
                    return BSN_SYSTEM
            except InvalidIdentifier:
                continue
    return US_SSN_SYSTEM


def bundle_files(source: Path) -> list[Path]:
    """The ``*.json`` files of a folder (or of its ``bundles/`` subfolder), sorted."""
    files = sorted(p for p in source.glob("*.json") if p.is_file())
    if not files and (source / "bundles").is_dir():
        files = sorted(p for p in (source / "bundles").glob("*.json") if p.is_file())
    if not files:
        raise InvalidInput(f"{source}: no *.json bundles found")
    return files


def _read_bundle(path: Path) -> Json:
    """Parse and shape-check one bundle; anything else is an InvalidBundle naming the file."""
    try:
        bundle = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidBundle(f"{path}: not a JSON file ({err})") from None
    except OSError as err:
        raise InvalidBundle(f"{path}: cannot be read ({err.strerror})") from None
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise InvalidBundle(f"{path}: not a FHIR Bundle (resourceType must be 'Bundle')")
    if not isinstance(bundle.get("type"), str):
        raise InvalidBundle(f"{path}: Bundle has no type")
    entries = bundle.setdefault("entry", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise InvalidBundle(f"{path}: Bundle.entry must be a list of objects")
    for number, entry in enumerate(entries):
        resource = entry.get("resource")
        if resource is not None and not (
            isinstance(resource, dict) and isinstance(resource.get("resourceType"), str)
        ):
            raise InvalidBundle(f"{path}: entry {number} has a resource without resourceType")
    return bundle


def _resources(bundle: Json, kind: str | None = None) -> Iterator[tuple[Json, Json]]:
    """(entry, resource) pairs, optionally of one resource type."""
    for entry in bundle["entry"]:
        resource = entry.get("resource")
        if resource is not None and (kind is None or resource["resourceType"] == kind):
            yield entry, resource


def _names(entry: Json, resource: Json) -> list[str]:
    """Every string a reference to this entry may use: its fullUrl and ``Type/id``."""
    names = []
    if isinstance(entry.get("fullUrl"), str):
        names.append(entry["fullUrl"])
    if isinstance(resource.get("id"), str):
        names.append(f"{resource['resourceType']}/{resource['id']}")
    return names


def _tokens(resource: Json) -> list[str]:
    """The ``system|value`` tokens of a resource's identifiers."""
    tokens = []
    for ident in resource.get("identifier") or []:
        if isinstance(ident, dict):
            system, value = ident.get("system"), ident.get("value")
            if isinstance(system, str) and isinstance(value, str) and system and value:
                tokens.append(f"{system}|{value}")
    return tokens


def _org_key(resource: Json) -> str | None:
    """An organisation's key: its first identifier token, else ``Organization/<id>``."""
    tokens = _tokens(resource)
    if tokens:
        return tokens[0]
    if isinstance(resource.get("id"), str):
        return f"Organization/{resource['id']}"
    return None


def _reference(value: Any) -> str | None:
    if isinstance(value, dict) and isinstance(value.get("reference"), str):
        return str(value["reference"])
    return None


def _provider_raw(encounter: Json, local_orgs: dict[str, Json]) -> str | None:
    """The organisation key an Encounter's serviceProvider points at, before aliasing.

    A ``urn:uuid:`` (or ``Organization/id``) reference resolves to an
    Organization entry of the same bundle; a conditional reference
    ``Organization?identifier=system|value`` is itself the key.
    """
    ref = _reference(encounter.get("serviceProvider"))
    if ref is None:
        return None
    if ref in local_orgs:
        return _org_key(local_orgs[ref])
    if ref.startswith("Organization?"):
        for param in ref.partition("?")[2].split("&"):
            name, _, value = param.partition("=")
            if name == "identifier" and value:
                return unquote(value)
        return None
    if ref.startswith("Organization/"):
        return ref
    return None


def _survey_bundle(path: Path, bundle: Json, survey: _Survey) -> None:
    """Pass 1 over one bundle: learn organisations, count encounters per organisation."""
    local_orgs: dict[str, Json] = {}
    for entry, org in _resources(bundle, "Organization"):
        key = _org_key(org)
        if key is None:
            continue
        for name in _tokens(org):
            survey.aliases.setdefault(name, key)
        for name in _names(entry, org):
            survey.aliases.setdefault(name, key)
            local_orgs[name] = org
        if isinstance(org.get("name"), str):
            survey.names.setdefault(key, org["name"])
    if next(_resources(bundle, "Patient"), None) is None:
        return  # a provider bundle
    survey.patient_files.add(path.name)
    seen: set[str] = set()
    for _, org in _resources(bundle, "Organization"):
        key = _org_key(org)
        if key is not None:
            seen.add(key)
            survey.encounters[key] += 0  # known, even with no encounters
    for _, encounter in _resources(bundle, "Encounter"):
        raw = _provider_raw(encounter, local_orgs)
        if raw is not None:
            survey.encounters[raw] += 1
            seen.add(raw)
    for raw in seen:
        survey.patients[raw] += 1


def _assign(survey: _Survey, nodes: int) -> tuple[dict[str, int], SpreadPlan]:
    """Give each organisation to the currently lightest node, heaviest organisation first."""
    weights: dict[str, list[int]] = {}  # encounters, then patients (a tie-breaker)
    for raw, count in survey.encounters.items():
        weight = weights.setdefault(survey.canon(raw), [0, 0])
        weight[0] += count
        weight[1] += survey.patients[raw]
    order = sorted(weights, key=lambda key: (-weights[key][0], -weights[key][1], key))
    plan = SpreadPlan(nodes=[NodeShare() for _ in range(nodes)], patients={})
    load = [0] * nodes
    org_node: dict[str, int] = {}
    for key in order:
        node = min(range(nodes), key=lambda i: (load[i], len(plan.nodes[i].organisations), i))
        org_node[key] = node
        load[node] += weights[key][0]
        plan.nodes[node].organisations.append(survey.names.get(key, key))
        plan.nodes[node].organisation_keys.append(key)
    return org_node, plan


def _encounter_refs(resource: Json) -> Iterator[str]:
    """References by which a resource says which encounter it was recorded in."""
    candidates: list[Any] = [resource.get("encounter")]
    context = resource.get("context")
    if isinstance(context, dict):
        candidates += [context.get("encounter"), context]  # DocumentReference; STU3 context
    for item in resource.get("item") or []:
        if isinstance(item, dict):
            candidates.append(item.get("encounter"))  # Claim, ExplanationOfBenefit
    for candidate in candidates:
        for value in candidate if isinstance(candidate, list) else [candidate]:
            ref = _reference(value)
            if ref is not None:
                yield ref


def _home(patient_id: str, counts: Counter[int], nodes: int) -> int:
    """The node with most of the patient's encounters; a stable hash if none."""
    if counts:
        return min(counts, key=lambda node: (-counts[node], node))
    return zlib.crc32(patient_id.encode()) % nodes


def _patient_id(entry: Json, patient: Json) -> str:
    if isinstance(patient.get("id"), str):
        return str(patient["id"])
    full_url = entry.get("fullUrl")
    return str(full_url).removeprefix("urn:uuid:") if full_url else ""


def _split_bundle(
    path: Path,
    bundle: Json,
    survey: _Survey,
    org_node: dict[str, int],
    targets: list[Path],
    plan: SpreadPlan,
) -> None:
    """Pass 2 over one patient bundle: place every entry, write one part per node."""
    patients = [(_patient_id(e, p), p) for e, p in _resources(bundle, "Patient")]
    placed, home = _place(bundle, survey, org_node, len(targets), patients[0][0])
    parts = sorted({node for node in placed if node is not None}) or [home]
    for node in parts:
        entries = [e for e, at in zip(bundle["entry"], placed, strict=True) if at in (None, node)]
        _write_json(targets[node] / path.name, {**bundle, "entry": entries})
        share = plan.nodes[node]
        share.resources += len(entries)
        share.encounters += sum(1 for e in entries if _kind(e) == "Encounter")
    for patient_id, patient in patients:
        before = plan.patients.get(patient_id)  # the same patient in an earlier file
        plan.patients[patient_id] = PatientSpread(
            nodes=sorted(set(parts).union(before.nodes if before else ())),
            home=before.home if before else home,
            identifiers=_identifier_pairs(patient),
            file=before.file if before else path.name,
        )


def _place(
    bundle: Json, survey: _Survey, org_node: dict[str, int], nodes: int, patient_id: str
) -> tuple[list[int | None], int]:
    """Each entry's node (None: every part, for the patient and providers) and the home node."""
    local_orgs = {
        name: org
        for entry, org in _resources(bundle, "Organization")
        for name in _names(entry, org)
    }
    by_provider: dict[int, int | None] = {}
    for _, encounter in _resources(bundle, "Encounter"):
        raw = _provider_raw(encounter, local_orgs)
        by_provider[id(encounter)] = None if raw is None else org_node.get(survey.canon(raw))
    home = _home(patient_id, Counter(n for n in by_provider.values() if n is not None), nodes)
    encounter_node: dict[int, int] = {}
    encounter_by_name: dict[str, int] = {}
    for entry, encounter in _resources(bundle, "Encounter"):
        node = by_provider[id(encounter)]
        encounter_node[id(encounter)] = home if node is None else node
        for name in _names(entry, encounter):
            encounter_by_name[name] = encounter_node[id(encounter)]
    placed: list[int | None] = []
    for entry in bundle["entry"]:
        resource = entry.get("resource")
        kind = _kind(entry)
        if kind == "Patient" or kind in PROVIDER_TYPES:
            placed.append(None)
        elif resource is None:
            placed.append(home)
        elif kind == "Encounter":
            placed.append(encounter_node[id(resource)])
        else:
            linked = (encounter_by_name.get(ref) for ref in _encounter_refs(resource))
            placed.append(next((n for n in linked if n is not None), home))
    return placed, home


def _kind(entry: Json) -> str | None:
    resource = entry.get("resource")
    return None if resource is None else str(resource["resourceType"])


def _identifier_pairs(patient: Json) -> list[tuple[str, str]]:
    return [(token.partition("|")[0], token.partition("|")[2]) for token in _tokens(patient)]


def _write_json(path: Path, document: Json) -> None:
    """Write next to the target and rename, so a reader never sees half a bundle."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")
    os.replace(partial, path)


def summary(plan: SpreadPlan) -> Iterable[str]:
    """Lines a person reads after a spread: per node its facility and counts."""
    for index, share in enumerate(plan.nodes):
        more = max(len(share.organisations) - 1, 0)
        name = share.organisations[0] if share.organisations else "(no organisation)"
        yield (
            f"node {index}: {name} (+{more} more organisations), "
            f"{share.patients} patients, {share.encounters} encounters, {share.resources} resources"
        )
    at = Counter(len(p.nodes) for p in plan.patients.values())
    yield "patients by number of nodes: " + ", ".join(f"{k}: {at[k]}" for k in sorted(at))


def main(argv: list[str] | None = None) -> int:
    """``python -m tools.spread SOURCE TARGET...``: spread a folder of bundles."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("source", type=given_path)
    parser.add_argument("targets", type=given_path, nargs="+")
    args = parser.parse_args(argv)
    try:
        plan = spread(args.source, args.targets)
    except InvalidInput as err:
        parser.exit(2, f"error: {err}\n")
    for line in summary(plan):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
