"""The demo's own small synthetic data: a Dutch care network in Synthea's shape.

The project ships no third-party data, yet the demo must show a patient
known at several facilities. This writes, from a seed alone, FHIR R4
transaction bundles shaped like Synthea's (``urn:uuid`` fullUrls and
references, POST requests, each bundle repeating the organisations and
practitioners it mentions), so whatever reads Synthea reads these too and
``tools.spread`` splits them over facility nodes the same way.

Everything is made up: organisations with 8-digit URA numbers, people with
BSNs in the 9999xxxxx range the Dutch BRP keeps for test persons (each
passes the 11-check), clinical notes in Dutch. The same seed gives the same
bytes: every choice, uuids included, comes from ``random.Random(seed)`` and
"now" is the fixed ``TODAY``.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import uuid
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

from tools import synthetic_codes as codes
from transmural.errors import InvalidIdentifier
from transmural.identifiers import BSN_SYSTEM, canonical_bsn
from transmural.process import given_path

URA_SYSTEM = "http://fhir.nl/fhir/NamingSystem/ura"
UZI_SYSTEM = "http://fhir.nl/fhir/NamingSystem/uzi-nr-pers"
MRN_SYSTEM = "https://transmural.example/fhir/NamingSystem/mrn"
ROLE_CODE_NL = "urn:oid:2.16.840.1.113883.2.4.15.1060"
LOINC, SNOMED, UCUM = "http://loinc.org", "http://snomed.info/sct", "http://unitsofmeasure.org"
RXNORM, CVX = "http://www.nlm.nih.gov/research/umls/rxnorm", "http://hl7.org/fhir/sid/cvx"
HL7_CS = "http://terminology.hl7.org/CodeSystem"
EXT = "http://hl7.org/fhir/StructureDefinition"
TODAY = datetime(2024, 6, 3, 12, 0)

Json = dict[str, Any]


@dataclass(frozen=True, slots=True)
class _Provider:
    """One organisation of the network and its one practitioner."""

    kind: str
    organisation: Json
    practitioner: Json


@dataclass(slots=True)
class _Visit:
    """One encounter and what was said about it, for the note."""

    id: str
    start: datetime
    provider: _Provider
    findings: list[str] = field(default_factory=list)
    diagnoses: list[str] = field(default_factory=list)
    plan: list[str] = field(default_factory=list)


def generate(target: Path, patients: int = 12, seed: int = 7) -> list[Path]:
    """Write ``patients`` transaction bundles into ``target``; return their paths."""
    rng = random.Random(seed)
    target.mkdir(parents=True, exist_ok=True)
    providers = [_provider(rng, *spec) for spec in codes.ORGANISATIONS]
    used_bsns: set[str] = set()
    paths = []
    for _ in range(patients):
        patient = _patient(rng, used_bsns)
        bundle = _patient_bundle(rng, patient, providers)
        name = patient["name"][0]
        path = (
            target / f"{name['given'][0]}_{name['family'].replace(' ', '-')}_{patient['id']}.json"
        )
        path.write_text(json.dumps(bundle, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def new_uuid(rng: random.Random) -> str:
    """A version-4 uuid drawn from the seeded generator, so runs repeat."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def fhir_datetime(moment: datetime) -> str:
    """An Amsterdam wall-clock time as a FHIR dateTime with its offset (+01:00 or +02:00).

    The EU summer-time rule is computed here rather than read from tzdata,
    which slim containers lack; only daytime hours are generated, so the
    hour of the switch itself never matters.
    """

    def last_sunday(month: int) -> date:
        day = date(moment.year, month, 31)
        return day - timedelta(days=(day.weekday() + 1) % 7)

    summer = last_sunday(3) <= moment.date() < last_sunday(10)
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + ("+02:00" if summer else "+01:00")


def _ref(resource: Json, display: str | None = None) -> Json:
    ref: Json = {"reference": f"urn:uuid:{resource['id']}"}
    if display:
        ref["display"] = display
    return ref


def _staff_ref(provider: _Provider) -> Json:
    return _ref(provider.practitioner, provider.practitioner["name"][0]["text"])


def _period(visit: _Visit) -> Json:
    end = visit.start + timedelta(minutes=20)
    return {"start": fhir_datetime(visit.start), "end": fhir_datetime(end)}


def _concept(system: str, code: str, display: str, text: str | None = None) -> Json:
    return {
        "coding": [{"system": system, "code": code, "display": display}],
        "text": text or display,
    }


def _entry(resource: Json, conditional: bool = False) -> Json:
    """A POST entry; shared providers are conditional creates, as Synthea 3 writes them."""
    request: Json = {"method": "POST", "url": resource["resourceType"]}
    if conditional:
        ident = resource["identifier"][0]
        request["ifNoneExist"] = f"identifier={ident['system']}|{ident['value']}"
    return {"fullUrl": f"urn:uuid:{resource['id']}", "resource": resource, "request": request}


def _human_name(given: str, prefix: str, own: str) -> Json:
    """A Dutch name, the voorvoegsel split out in ``_family`` as nl-core does."""
    family = f"{prefix} {own}" if prefix else own
    parts = [{"url": f"{EXT}/humanname-own-prefix", "valueString": prefix}] if prefix else []
    parts.append({"url": f"{EXT}/humanname-own-name", "valueString": own})
    return {
        "use": "official",
        "text": f"{given} {family}",
        "family": family,
        "_family": {"extension": parts},
        "given": [given],
    }


def _address(line: str, city: str, postcode: str, use: str) -> Json:
    return {"use": use, "line": [line], "city": city, "postalCode": postcode, "country": "NL"}


def _provider(
    rng: random.Random, kind: str, name: str, city: str, street: str, postcode: str, *role: str
) -> _Provider:
    organisation = {
        "resourceType": "Organization",
        "id": new_uuid(rng),
        "identifier": [{"system": URA_SYSTEM, "value": str(rng.randrange(10**7, 10**8))}],
        "active": True,
        "type": [_concept(ROLE_CODE_NL, role[0], role[1])],
        "name": name,
        "telecom": [
            {"system": "phone", "value": f"020-{rng.randrange(10**6, 10**7)}", "use": "work"}
        ],
        "address": [_address(street, city, postcode, "work")],
    }
    gender = rng.choice(("female", "male"))
    person = _human_name(rng.choice(codes.GIVEN[gender]), *rng.choice(codes.FAMILY))
    if kind != "pharmacy":
        person["prefix"] = ["dr."]
    practitioner = {
        "resourceType": "Practitioner",
        "id": new_uuid(rng),
        "identifier": [{"system": UZI_SYSTEM, "value": str(rng.randrange(10**8, 10**9))}],
        "active": True,
        "name": [person],
        "gender": gender,
    }
    return _Provider(kind, organisation, practitioner)


def _bsn(rng: random.Random, used: set[str]) -> str:
    """A fresh BSN in the 9999xxxxx test range that passes the 11-check."""
    while True:
        try:
            bsn = canonical_bsn(f"9999{rng.randrange(100_000):05d}")
        except InvalidIdentifier:
            continue
        if bsn not in used:
            used.add(bsn)
            return bsn


def _patient(rng: random.Random, used_bsns: set[str]) -> Json:
    gender = rng.choice(("female", "male"))
    name = _human_name(rng.choice(codes.GIVEN[gender]), *rng.choice(codes.FAMILY))
    birth = (TODAY - timedelta(days=rng.randrange(2 * 365, 95 * 365))).date()
    city, area = rng.choice(codes.CITIES)
    postcode = (
        f"{area}{rng.randrange(10, 100)} {rng.choice(codes.LETTERS)}{rng.choice(codes.LETTERS)}"
    )
    street = f"{rng.choice(codes.STREETS)} {rng.randrange(1, 200)}"
    mrn_type = _concept(f"{HL7_CS}/v2-0203", "MR", "Medical Record Number")
    return {
        "resourceType": "Patient",
        "id": new_uuid(rng),
        "identifier": [
            {"type": mrn_type, "system": MRN_SYSTEM, "value": str(rng.randrange(10**6, 10**7))},
            {"use": "official", "system": BSN_SYSTEM, "value": _bsn(rng, used_bsns)},
        ],
        "name": [name],
        "telecom": [
            {"system": "phone", "value": f"06-{rng.randrange(10**7, 10**8)}", "use": "mobile"}
        ],
        "gender": gender,
        "birthDate": birth.isoformat(),
        "address": [_address(street, city, postcode, "home")],
        "communication": [
            {"language": _concept("urn:ietf:bcp:47", "nl-NL", "Dutch", "Nederlands")}
        ],
    }


def _choose_providers(rng: random.Random, age: int, providers: list[_Provider]) -> list[_Provider]:
    """1-3 organisations, the GP practice most often among them, as care goes."""
    pool = [p for p in providers if p.kind != "nursing-home" or age >= 65]
    count = rng.choices((1, 2, 3), weights=(3, 4, 4))[0]
    chosen = [p for p in pool if p.kind == "gp"] if rng.random() < 0.7 else []
    while len(chosen) < count:
        candidate = rng.choice(pool)
        if candidate not in chosen:
            chosen.append(candidate)
    return chosen


def _patient_bundle(rng: random.Random, patient: Json, providers: list[_Provider]) -> Json:
    age = (TODAY.date() - date.fromisoformat(patient["birthDate"])).days // 365
    chosen = _choose_providers(rng, age, providers)
    extra = rng.randrange(max(3, len(chosen)), 9) - len(chosen)
    places = chosen + [rng.choice(chosen) for _ in range(extra)]
    rng.shuffle(places)
    days = sorted((rng.randrange(1, 3 * 365) for _ in places), reverse=True)
    visits = []
    for day, place in zip(days, places, strict=True):
        start = TODAY - timedelta(days=day)
        start = start.replace(hour=rng.randrange(8, 17), minute=rng.choice((0, 15, 30, 45)))
        visits.append(_Visit(new_uuid(rng), start, place))
    clinical = _clinical(rng, patient, age, visits)
    shared = [p for p in providers if p in chosen]
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            _entry(patient),
            *(_entry(p.organisation, conditional=True) for p in shared),
            *(_entry(p.practitioner, conditional=True) for p in shared),
            *(_entry(r) for r in clinical),
        ],
    }


def _clinical(rng: random.Random, patient: Json, age: int, visits: list[_Visit]) -> list[Json]:
    """Encounters and what was recorded in them, in the order a record grows."""
    subject = _ref(patient, patient["name"][0]["text"])
    prescribers = [v for v in visits if v.provider.kind in ("gp", "hospital")] or visits
    chronic = [c[1:] for c in codes.CHRONIC if c[0] <= age]
    count = rng.randrange(0, min(3, len(chronic)) + 1)
    diagnosed_at = [(c, rng.choice(prescribers)) for c in rng.sample(chronic, count)]
    # A person's vital signs stay near their own level (a fever does not); a child weighs less.
    baseline = {v[0]: rng.uniform(v[4], v[5]) for v in codes.VITALS if v[0] != "8310-5"}
    baseline["29463-7"] *= (min(age, 18) + 2) / 20
    known: list[str] = []
    out: list[Json] = []
    for visit in visits:
        visit.diagnoses += [f"bekend met {k}" for k in known]
        encounter = _encounter(visit, subject)
        records = _observations(rng, visit, subject, baseline)
        for condition, at in diagnosed_at:
            if at is visit:
                records += _diagnosis(rng, visit, subject, condition, chronic=True)
                known.append(condition[2])
        if visit.provider.kind in ("gp", "hospital") and rng.random() < 0.3:
            records += _diagnosis(rng, visit, subject, rng.choice(codes.ACUTE), chronic=False)
        if visit.provider.kind != "pharmacy" and rng.random() < 0.25:
            records.append(_immunization(rng, visit, subject))
        out += [encounter, *records, _document(rng, visit, subject, patient)]
    if rng.random() < 0.3:
        out.append(_allergy(rng, visits[0], subject))
    return out


def _encounter(visit: _Visit, subject: Json) -> Json:
    provider = visit.provider
    _, _, code, display = codes.VISIT_KINDS[provider.kind]
    return {
        "resourceType": "Encounter",
        "id": visit.id,
        "status": "finished",
        "class": {"system": f"{HL7_CS}/v3-ActCode", "code": "AMB", "display": "ambulatory"},
        "type": [_concept(SNOMED, code, display)],
        "subject": subject,
        "participant": [{"individual": _staff_ref(provider)}],
        "period": _period(visit),
        "serviceProvider": _ref(provider.organisation, provider.organisation["name"]),
    }


def _link(visit: _Visit, subject: Json, resource_type: str, rng: random.Random) -> Json:
    """The fields every clinical resource of a visit shares."""
    key = "patient" if resource_type in ("Immunization", "AllergyIntolerance") else "subject"
    return {
        "resourceType": resource_type,
        "id": new_uuid(rng),
        key: subject,
        "encounter": {"reference": f"urn:uuid:{visit.id}"},
    }


def _observations(
    rng: random.Random, visit: _Visit, subject: Json, baseline: dict[str, float]
) -> list[Json]:
    vitals, labs, _, _ = codes.VISIT_KINDS[visit.provider.kind]
    chosen = [("vital-signs", v) for v in rng.sample(codes.VITALS, rng.randint(*vitals))]
    chosen += [("laboratory", lab) for lab in rng.sample(codes.LABS, rng.randint(*labs))]
    out = []
    for category, (code, display, label, unit, low, high, decimals) in chosen:
        level = baseline[code] * rng.uniform(0.96, 1.04) if code in baseline else None
        value = round(level or rng.uniform(low, high), decimals or None)
        visit.findings.append(f"{label} {value} {unit}")
        title = category.replace("-", " ").title()
        out.append(
            {
                **_link(visit, subject, "Observation", rng),
                "status": "final",
                "category": [_concept(f"{HL7_CS}/observation-category", category, title)],
                "code": _concept(LOINC, code, display),
                "effectiveDateTime": fhir_datetime(visit.start),
                "issued": fhir_datetime(visit.start + timedelta(minutes=10)),
                "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit},
            }
        )
    return out


def _diagnosis(
    rng: random.Random,
    visit: _Visit,
    subject: Json,
    condition: tuple[str, str, str, str],
    chronic: bool,
) -> list[Json]:
    """A Condition and, when it is treated, the MedicationRequest for it."""
    code, display, text, medication = condition
    status = "active" if chronic else "resolved"
    resource = {
        **_link(visit, subject, "Condition", rng),
        "clinicalStatus": _concept(f"{HL7_CS}/condition-clinical", status, status.title()),
        "verificationStatus": _concept(f"{HL7_CS}/condition-ver-status", "confirmed", "Confirmed"),
        "category": [
            _concept(f"{HL7_CS}/condition-category", "encounter-diagnosis", "Encounter Diagnosis")
        ],
        "code": _concept(SNOMED, code, display, text),
        "onsetDateTime": fhir_datetime(visit.start),
        "recordedDate": fhir_datetime(visit.start),
    }
    if not chronic:
        resource["abatementDateTime"] = fhir_datetime(visit.start + timedelta(days=14))
    visit.diagnoses.append(text)
    if not medication:
        visit.plan.append(f"{text}: niet-medicamenteus beleid, uitleg gegeven")
        return [resource]
    rxnorm, drug, dosage = codes.MEDICATIONS[medication]
    visit.plan.append(f"start {drug}, {dosage}")
    request = {
        **_link(visit, subject, "MedicationRequest", rng),
        "status": "active" if chronic else "completed",
        "intent": "order",
        "medicationCodeableConcept": _concept(RXNORM, rxnorm, drug),
        "authoredOn": fhir_datetime(visit.start),
        "requester": _staff_ref(visit.provider),
        "reasonReference": [_ref(resource)],
        "dosageInstruction": [{"sequence": 1, "text": dosage}],
    }
    return [resource, request]


def _immunization(rng: random.Random, visit: _Visit, subject: Json) -> Json:
    code, display = rng.choice(codes.VACCINES)
    visit.plan.append(f"vaccinatie gegeven: {display}")
    return {
        **_link(visit, subject, "Immunization", rng),
        "status": "completed",
        "vaccineCode": _concept(CVX, code, display),
        "occurrenceDateTime": fhir_datetime(visit.start),
        "primarySource": True,
    }


def _allergy(rng: random.Random, visit: _Visit, patient: Json) -> Json:
    """An allergy with no encounter, as Synthea records them: it lives at the home node."""
    code, display, category = rng.choice(codes.ALLERGIES)
    resource = _link(visit, patient, "AllergyIntolerance", rng)
    del resource["encounter"]
    return {
        **resource,
        "clinicalStatus": _concept(f"{HL7_CS}/allergyintolerance-clinical", "active", "Active"),
        "verificationStatus": _concept(
            f"{HL7_CS}/allergyintolerance-verification", "confirmed", "Confirmed"
        ),
        "type": "allergy",
        "category": [category],
        "criticality": rng.choice(("low", "high")),
        "code": _concept(SNOMED, code, display),
        "recordedDate": fhir_datetime(visit.start),
    }


def _note_text(visit: _Visit, patient: Json) -> str:
    """A short SOEP progress note (the Dutch SOAP) for one visit."""
    age = (visit.start.date() - date.fromisoformat(patient["birthDate"])).days // 365
    provider = visit.provider
    findings = ", ".join(visit.findings) or "geen bijzonderheden"
    diagnoses = "; ".join(visit.diagnoses) or "geen nieuwe bevindingen"
    plan = "; ".join(visit.plan) or "beleid ongewijzigd, controle over 3 maanden"
    return (
        f"Voortgangsverslag — {provider.organisation['name']}\n"
        f"Datum: {visit.start:%d-%m-%Y %H:%M}\n"
        f"Patiënt: {patient['name'][0]['text']}, {age} jaar\n\n"
        f"S: {codes.REASONS[provider.kind]}\n"
        f"O: {findings}.\n"
        f"E: {diagnoses}.\n"
        f"P: {plan}.\n\n"
        f"{provider.practitioner['name'][0]['text']}\n"
    )


def _document(rng: random.Random, visit: _Visit, subject: Json, patient: Json) -> Json:
    """One progress note per encounter, inline base64 like Synthea 3's notes."""
    text = _note_text(visit, patient)
    doc_id = new_uuid(rng)
    provider = visit.provider
    period = _period(visit)
    return {
        "resourceType": "DocumentReference",
        "id": doc_id,
        "identifier": [{"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{doc_id}"}],
        "status": "current",
        "docStatus": "final",
        "type": _concept(LOINC, "11506-3", "Progress note", "Voortgangsverslag"),
        "category": [
            _concept(
                "http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category",
                "clinical-note",
                "Clinical Note",
            )
        ],
        "subject": subject,
        "date": period["end"],
        "author": [_staff_ref(provider)],
        "custodian": _ref(provider.organisation, provider.organisation["name"]),
        "description": f"Voortgangsverslag {provider.organisation['name']} {visit.start:%d-%m-%Y}",
        "content": [
            {
                "attachment": {
                    "contentType": "text/plain; charset=utf-8",
                    "language": "nl-NL",
                    "data": base64.b64encode(text.encode("utf-8")).decode("ascii"),
                    "title": f"Voortgangsverslag {visit.start:%d-%m-%Y}",
                    "creation": period["end"],
                }
            }
        ],
        "context": {"encounter": [{"reference": f"urn:uuid:{visit.id}"}], "period": period},
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m tools.synthetic TARGET [--patients N] [--seed S]``."""
    parser = argparse.ArgumentParser(description="Write the demo's synthetic FHIR bundles.")
    parser.add_argument("target", type=given_path)
    parser.add_argument("--patients", type=int, default=12)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    for path in generate(args.target, args.patients, args.seed):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
