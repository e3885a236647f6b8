"""Consent records as FHIR R4 ``Consent`` resources, one to one.

A ``ConsentRecord`` is exported as exactly one Consent and read back
unchanged (``from_fhir(to_fhir(r)) == r``; ``to_fhir(from_fhir(x)) == x``
for our exports). A Consent from elsewhere is imported only when every rule
in it has a place in the record; anything that would change who may see
what and that the record cannot hold is refused, naming the element, never
dropped. Elements that only describe (narrative, identifier, custodian
``organization``, ``sourceAttachment``, non-modifier extensions) are not kept.

The mapping::

    status            active / inactive (= withdrawn; extension consent-withdrawn-at)
    scope             consentscope patient-privacy (nothing else is imported)
    category          LOINC 59284-0 "Patient Consent" (nothing else is imported)
    patient           the patient, as the caller names them (not read back)
    dateTime          recorded_at
    performer         recorded_by, as display (on import: display, else reference)
    extension         consent-recorded-via: desk | portal (import default: desk)
    organization      the custodian: this node's organisation id (not read back)
    policyRule        v3-ActCode OPTIN (permit) / OPTOUT (deny)
    provision.type    the decision; without it, the policyRule's
    provision.period  the period; without a start, from dateTime
    provision.actor   one, role IRCP (PRCP also read), reference.identifier
                      URA (also the URA OID) = organisation id, or
                      ORGANISATION_CATEGORY_SYSTEM = category; none = everyone
    provision.action  (import) must include consentaction access, the one action here
    provision.code    codes of DATA_CATEGORY_SYSTEM; none = all data

An actor given as a literal ``Organization/x`` reference is read only when
the caller maps it to an organisation id (the CLI looks the Organization up
in the node's store and takes its URA): guessing would turn a deny for that
organisation into a deny for no one.

The 12 official R4 examples (../shared/data/hl7-fhir-r4-examples):

- imported: ``basic`` (permit all data to all, 1964-01-01 to 2016-01-01),
  ``notTime`` (the same for January 2015: its narrative speaks of
  withholding records *from* that time, but its coded content is an OPTIN
  with a validity period, and the coded content is what is imported),
  ``notOrg`` (deny all data to Organization/f001; only with that
  organisation's id known, refused otherwise).
- refused: ``Out`` and ``notAuthor`` (actor role CST: whose records, not
  who may see them); ``notThem`` (actor is a Practitioner: individuals are
  not modelled); ``notThis`` (provision.data: single resources);
  ``Emergency`` (category EMRGONLY, provision.purpose, nested provision);
  ``grantor`` (category INFAO, two actors); ``signature`` (category npp,
  Practitioner actor, nested provision with class and LOINC document codes);
  ``smartonfhir`` (nested provision with a resource-type class); ``pkb``
  (nested provisions, securityLabel).
"""

from __future__ import annotations

import html
from collections.abc import Iterator, Mapping
from typing import Any

from node.consent import (
    DATA_CATEGORIES,
    ConsentRecord,
    describe,
    is_consent_id,
    is_fhir_datetime,
    new_consent_id,
)
from transmural.errors import InvalidInput

URA_SYSTEM = "http://fhir.nl/fhir/NamingSystem/ura"
URA_OID = "urn:oid:2.16.528.1.1007.3.3"
ORGANISATION_CATEGORY_SYSTEM = "https://transmural.dev/fhir/CodeSystem/organisation-category"
DATA_CATEGORY_SYSTEM = "https://transmural.dev/fhir/CodeSystem/data-category"
RECORDED_VIA_URL = "https://transmural.dev/fhir/StructureDefinition/consent-recorded-via"
WITHDRAWN_AT_URL = "https://transmural.dev/fhir/StructureDefinition/consent-withdrawn-at"
SCOPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/consentscope"
LOINC = "http://loinc.org"
PATIENT_CONSENT = "59284-0"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
CONSENT_ACTION = "http://terminology.hl7.org/CodeSystem/consentaction"
#: Default ``recorded_by`` for an imported Consent that names no performer.
IMPORTED_BY = "FHIR import"

_POLICY = {"OPTIN": "permit", "OPTOUT": "deny"}
_RECIPIENT_ROLES = ("IRCP", "PRCP")
#: Root elements that only describe: read past, not kept.
_DESCRIPTIVE = {
    "id", "meta", "text", "language", "contained", "extension", "identifier", "patient",
    "organization", "sourceAttachment", "sourceReference", "verification",
}  # fmt: skip
_READ = {"resourceType", "status", "scope", "category", "dateTime", "performer", "policyRule"}
_ROOT_REFUSED = {
    "modifierExtension": "modifier extensions change the meaning and are not understood here",
    "implicitRules": "implicit rules are not understood here",
    "policy": "outside policy documents are not modelled (policyRule OPTIN/OPTOUT is)",
}
_PROVISION_READ = {"id", "extension", "type", "period", "actor", "action", "code"}
_PROVISION_REFUSED = {
    "modifierExtension": "modifier extensions change the meaning and are not understood here",
    "securityLabel": "security labels are not modelled",
    "purpose": "purpose-of-use restrictions are not modelled",
    "class": "resource types and formats are not modelled (data categories in code are)",
    "dataPeriod": "a period of the data (rather than of the consent) is not modelled",
    "data": "consent about single resources is not modelled",
    "provision": "nested provisions are not modelled: one consent here is one rule",
}


def to_fhir(record: ConsentRecord, patient_reference: str, custodian_org_id: str) -> dict[str, Any]:
    """The R4 Consent for ``record`` (module doc); the custodian is left out when empty."""
    extension: list[dict[str, Any]] = [{"url": RECORDED_VIA_URL, "valueCode": record.recorded_via}]
    if record.withdrawn_at is not None:
        extension.append({"url": WITHDRAWN_AT_URL, "valueDateTime": record.withdrawn_at})
    provision: dict[str, Any] = {"type": record.decision, "period": {"start": record.period_start}}
    if record.period_end is not None:
        provision["period"]["end"] = record.period_end
    if record.actor_kind != "all":
        system = URA_SYSTEM if record.actor_kind == "organisation" else ORGANISATION_CATEGORY_SYSTEM
        provision["actor"] = [
            {
                "role": _concept(PARTICIPATION, "IRCP"),
                "reference": {"identifier": {"system": system, "value": record.actor}},
            }
        ]
    if record.data:
        codes = [c for c in DATA_CATEGORIES if c in record.data]
        provision["code"] = [_concept(DATA_CATEGORY_SYSTEM, code) for code in codes]
    resource: dict[str, Any] = {
        "resourceType": "Consent",
        "id": record.consent_id,
        "text": {
            "status": "generated",
            "div": f'<div xmlns="http://www.w3.org/1999/xhtml">{html.escape(describe(record))}'
            "</div>",
        },
        "extension": extension,
        "status": "active" if record.status == "active" else "inactive",
        "scope": _concept(SCOPE_SYSTEM, "patient-privacy"),
        "category": [_concept(LOINC, PATIENT_CONSENT)],
        "patient": {"reference": patient_reference},
        "dateTime": record.recorded_at,
        "performer": [{"display": record.recorded_by}],
        "policyRule": _concept(ACT_CODE, "OPTIN" if record.decision == "permit" else "OPTOUT"),
        "provision": provision,
    }
    if custodian_org_id:
        resource["organization"] = [
            {"identifier": {"system": URA_SYSTEM, "value": custodian_org_id}}
        ]
    return resource


def to_bundle(
    records: list[ConsentRecord], patient_reference: str, custodian_org_id: str
) -> dict[str, Any]:
    """A ``collection`` Bundle of the records' Consents, in the order given."""
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"resource": to_fhir(record, patient_reference, custodian_org_id)} for record in records
        ],
    }


def _concept(system: str, code: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code}]}


# --- import ---


def from_fhir(
    resource: object,
    patient_key: int,
    *,
    organisations: Mapping[str, str] | None = None,
    recorded_by: str = IMPORTED_BY,
    where: str = "Consent",
) -> ConsentRecord:
    """The record one R4 Consent maps onto; InvalidInput naming ``where`` and each element not.

    ``organisations`` maps literal ``Organization/x`` references to
    organisation ids; ``recorded_by`` stands in when no performer is named.
    Our own ids (``c-`` + 12 hex) are kept; any other id gets a new one.
    """
    if not isinstance(resource, dict) or resource.get("resourceType") != "Consent":
        raise InvalidInput(f"{where}: not a FHIR Consent resource")
    reader = _Reader(organisations or {})
    fields = reader.read(resource, recorded_by)
    if reader.problems:
        raise InvalidInput(f"{where}: cannot import: {'; '.join(reader.problems)}")
    own_id = resource.get("id")
    ours = isinstance(own_id, str) and is_consent_id(own_id)
    fields["consent_id"] = own_id if ours else new_consent_id()
    try:
        return ConsentRecord(patient_key=patient_key, **fields)
    except InvalidInput as error:
        raise InvalidInput(f"{where}: cannot import: {error}") from None


def consents_from_json(
    document: object,
    patient_key: int,
    *,
    organisations: Mapping[str, str] | None = None,
    recorded_by: str = IMPORTED_BY,
    source: str = "input",
) -> list[ConsentRecord]:
    """Every Consent of a Consent or a Bundle of them, all or none (every problem named).

    A Bundle's Consents must all be about one patient (one ``patient``
    reference): the records are filed under the one ``patient_key``.
    """
    if isinstance(document, dict) and document.get("resourceType") == "Bundle":
        entries = document.get("entry") or []
        if not isinstance(entries, list):
            raise InvalidInput(f"{source}: Bundle.entry is not a list")
        resources = [(e.get("resource") if isinstance(e, dict) else None) for e in entries]
        labelled = [(f"{source} entry[{i}]", r) for i, r in enumerate(resources)]
    else:
        labelled = [(source, document)]
    if not labelled:
        raise InvalidInput(f"{source}: the Bundle holds no Consent")
    records: list[ConsentRecord] = []
    problems: list[str] = []
    for where, resource in labelled:
        try:
            records.append(
                from_fhir(resource, patient_key, organisations=organisations,
                          recorded_by=recorded_by, where=where)
            )  # fmt: skip
        except InvalidInput as error:
            problems.append(str(error))
    patients = {p for _, r in labelled if (p := _patient_reference(r)) is not None}
    if len(patients) > 1:
        problems.append(
            f"{source}: Consents of more than one patient ({', '.join(sorted(patients))})"
        )
    if problems:
        raise InvalidInput("\n".join(problems))
    return records


def organisation_references(document: object) -> set[str]:
    """The literal ``Organization/x`` references among the actors of a Consent or Bundle."""
    return {
        reference
        for provision in _provisions(document)
        for actor in _list(provision.get("actor"))
        if isinstance(actor, dict)
        for reference in [_dict(actor.get("reference")).get("reference")]
        if isinstance(reference, str) and reference.startswith("Organization/")
    }


def organisation_id_of(organization: object) -> str | None:
    """The URA of an Organization resource (under the URA system or its OID), if it has one."""
    for identifier in _list(_dict(organization).get("identifier")):
        identifier = _dict(identifier)
        value = identifier.get("value")
        if identifier.get("system") in (URA_SYSTEM, URA_OID) and isinstance(value, str):
            return value
    return None


def _provisions(document: object) -> Iterator[dict[str, Any]]:
    document = _dict(document)
    if document.get("resourceType") == "Bundle":
        for entry in _list(document.get("entry")):
            yield from _provisions(_dict(entry).get("resource"))
        return
    pending = [document.get("provision")]
    while pending:
        provision = _dict(pending.pop())
        if provision:
            yield provision
            pending.extend(_list(provision.get("provision")))


def _patient_reference(resource: object) -> str | None:
    reference = _dict(_dict(resource).get("patient")).get("reference")
    return reference if isinstance(reference, str) else None


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _codes(concept: object) -> list[tuple[str, str]]:
    """(system, code) of every coding of a CodeableConcept."""
    return [
        (str(c.get("system", "")), str(c.get("code", "")))
        for c in _list(_dict(concept).get("coding"))
        if isinstance(c, dict)
    ]


def _named(codes: list[tuple[str, str]]) -> str:
    return ", ".join(f"{system.rsplit('/', 1)[-1]} {code}" for system, code in codes) or "no code"


class _Reader:
    """Reads one Consent into ConsentRecord fields, noting every element it cannot hold."""

    def __init__(self, organisations: Mapping[str, str]) -> None:
        self._organisations = organisations
        self.problems: list[str] = []

    def refuse(self, path: str, why: str) -> None:
        self.problems.append(f"{path}: {why}")

    def read(self, resource: dict[str, Any], recorded_by: str) -> dict[str, Any]:
        for key in sorted(set(resource) - _DESCRIPTIVE - _READ - {"provision"}):
            self.refuse(key, _ROOT_REFUSED.get(key, "not an R4 Consent element"))
        status = resource.get("status")
        if status not in ("active", "inactive"):
            self.refuse("status", f"{status!r}: only active and inactive (withdrawn) consents")
        if (SCOPE_SYSTEM, "patient-privacy") not in _codes(resource.get("scope")):
            self.refuse("scope", "only patient-privacy consents are modelled")
        categories = _list(resource.get("category"))
        if not categories:
            self.refuse("category", f"missing (LOINC {PATIENT_CONSENT} patient consent)")
        for index, category in enumerate(categories):
            codes = _codes(category)
            if (LOINC, PATIENT_CONSENT) not in codes:
                self.refuse(f"category[{index}]", f"{_named(codes)} is a kind of consent not "
                            f"modelled (only LOINC {PATIENT_CONSENT} patient consent)")  # fmt: skip
        recorded_at = resource.get("dateTime")
        if not is_fhir_datetime(recorded_at):
            self.refuse("dateTime", "missing, or not a FHIR dateTime (when it was recorded)")
        extensions = {
            e.get("url"): e for e in _list(resource.get("extension")) if isinstance(e, dict)
        }
        withdrawn_at = _dict(extensions.get(WITHDRAWN_AT_URL)).get("valueDateTime")
        if status == "inactive" and withdrawn_at is None:
            self.refuse("status", f"inactive without a withdrawal time ({WITHDRAWN_AT_URL})")
        provision = _dict(resource.get("provision"))
        for key in sorted(set(provision) - _PROVISION_READ):
            self.refuse(f"provision.{key}", _PROVISION_REFUSED.get(key, "not an R4 element"))
        period = _dict(provision.get("period"))
        kind, actor = self._actor(provision)
        return {
            "decision": self._decision(resource, provision),
            "actor_kind": kind,
            "actor": actor,
            "data": self._data(provision),
            "period_start": period.get("start", recorded_at),
            "period_end": period.get("end"),
            "recorded_by": _performer(resource) or recorded_by,
            "recorded_via": _dict(extensions.get(RECORDED_VIA_URL)).get("valueCode", "desk"),
            "recorded_at": recorded_at,
            "status": "withdrawn" if status == "inactive" else "active",
            "withdrawn_at": withdrawn_at if status == "inactive" else None,
        }

    def _decision(self, resource: dict[str, Any], provision: dict[str, Any]) -> str:
        if "action" in provision:
            actions = [code for a in _list(provision["action"]) for code in _codes(a)]
            if (CONSENT_ACTION, "access") not in actions:
                self.refuse("provision.action", f"{_named(actions)}: only access is modelled")
        policy = [_POLICY[code] for s, code in _codes(resource.get("policyRule")) if
                  s == ACT_CODE and code in _POLICY]  # fmt: skip
        if "policyRule" in resource and not policy:
            self.refuse("policyRule", f"{_named(_codes(resource['policyRule']))}: only "
                        "OPTIN and OPTOUT are modelled")  # fmt: skip
        decision = provision.get("type", policy[0] if policy else None)
        if decision not in ("permit", "deny"):
            self.refuse("provision.type", "neither permit nor deny (nor a policyRule to tell)")
        return str(decision)

    def _actor(self, provision: dict[str, Any]) -> tuple[str, str]:
        actors = _list(provision.get("actor"))
        if not actors:
            return "all", ""
        if len(actors) > 1:
            self.refuse("provision.actor", f"{len(actors)} actors: a consent here covers one")
        for index, actor in enumerate(actors):
            codes = _codes(_dict(actor).get("role"))
            if not any(s == PARTICIPATION and c in _RECIPIENT_ROLES for s, c in codes):
                self.refuse(f"provision.actor[{index}].role", f"{_named(codes)}: only "
                            "information recipients (IRCP, PRCP) are modelled")  # fmt: skip
        return self._whom(_dict(_dict(actors[0]).get("reference")))

    def _whom(self, reference: dict[str, Any]) -> tuple[str, str]:
        path = "provision.actor[0].reference"
        identifier = _dict(reference.get("identifier"))
        system, value = identifier.get("system"), str(identifier.get("value", ""))
        literal = reference.get("reference")
        if system in (URA_SYSTEM, URA_OID):
            return "organisation", value
        if system == ORGANISATION_CATEGORY_SYSTEM:
            return "category", value
        if identifier:
            self.refuse(path, f"identifier system {system}: organisations are named by URA")
        elif isinstance(literal, str) and literal.startswith("Organization/"):
            if literal in self._organisations:
                return "organisation", self._organisations[literal]
            self.refuse(path, f"{literal}: no organisation id (URA) known for it here")
        elif isinstance(literal, str):
            self.refuse(path, f"{literal}: only organisations and organisation categories "
                        "are modelled, not individuals")  # fmt: skip
        else:
            self.refuse(path, "names no organisation")
        return "all", ""

    def _data(self, provision: dict[str, Any]) -> frozenset[str]:
        data: set[str] = set()
        for index, concept in enumerate(_list(provision.get("code"))):
            codes = [c for s, c in _codes(concept) if s == DATA_CATEGORY_SYSTEM]
            if not codes or codes[0] not in DATA_CATEGORIES:
                self.refuse(f"provision.code[{index}]", f"{_named(_codes(concept))}: data is "
                            f"named by {DATA_CATEGORY_SYSTEM} codes")  # fmt: skip
            else:
                data.add(codes[0])
        return frozenset(data)


def _performer(resource: dict[str, Any]) -> str:
    names = []
    for performer in _list(resource.get("performer")):
        performer = _dict(performer)
        name = performer.get("display") or performer.get("reference")
        if isinstance(name, str) and name.strip():
            names.append(name.strip())
    return ", ".join(names)
