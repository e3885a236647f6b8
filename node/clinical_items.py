"""A patient's stored FHIR resources as the entries of the live report.

The report merges every facility's entries by (section, code system, code),
so each entry carries one code, picked the same way everywhere: the first
coding of a system the report knows (SNOMED CT, RxNorm, LOINC, CVX), else
the first coding with a code. A resource without any code cannot be merged
or shown by name and is left out; ``Extraction.skipped`` counts those.

A blood pressure (or any observation made of components) is one entry,
not one per component: clinicians read "120/80 mm[Hg]" as one value, and
the report keeps the latest value per code, which must not split the two
halves of one measurement. Components with one shared unit give
``value="120/80"`` and that unit, systolic first whatever order the source
used (Synthea writes diastolic first); components with different units give
``"12 kg/m2 / 3 cm"`` with the units in the value and ``unit=""``.

Dates are ISO 8601 (``node.fhir.normalise_datetime``): partial dates as
they were, date-times in UTC, so "newest first" is a string sort.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from node.fhir import JSONObject, compact_json, concept_text, normalise_datetime

SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
LOINC = "http://loinc.org"
CVX = "http://hl7.org/fhir/sid/cvx"
#: Code systems preferred, in this order, when a concept has several codings.
KNOWN_SYSTEMS = (SNOMED, RXNORM, LOINC, CVX)

#: Report sections, in the order the report shows them.
SECTIONS = (
    "problems", "medication", "allergies", "results", "encounters", "procedures",
    "immunisations",
)  # fmt: skip
#: Components shown first, in this order: systolic before diastolic pressure.
_COMPONENTS_FIRST = {"8480-6": 0, "8462-4": 1}
#: Observation categories that are results; "vital-sign" is how some
#: Synthea exports misspell "vital-signs".
RESULT_CATEGORIES = frozenset({"laboratory", "vital-signs", "vital-sign"})


@dataclass(frozen=True, slots=True)
class ClinicalItem:
    """One entry of a facility's record; mirrors the proto ``ClinicalItem``."""

    section: str
    code_system: str
    code: str
    display: str
    status: str
    date: str
    value: str = ""
    unit: str = ""
    resource_id: str = ""  # Type/id at the facility
    resource_json: bytes = b""  # the FHIR R4 resource, for the FHIR export


@dataclass(frozen=True, slots=True)
class Extraction:
    """The entries found, and how many report resources had no usable code."""

    items: list[ClinicalItem]
    skipped: int = 0


def items_from(resources: Iterable[JSONObject]) -> list[ClinicalItem]:
    """The report entries among ``resources`` (see ``extract``)."""
    return extract(resources).items


def extract(resources: Iterable[JSONObject]) -> Extraction:
    """Entries of every report resource; others (billing, surveys, ...) are ignored."""
    items: list[ClinicalItem] = []
    skipped = 0
    for resource in resources:
        reader = _READERS.get(resource.get("resourceType", ""))
        if reader is None or not _in_report(resource):
            continue
        item = reader(resource)
        if item is None:
            skipped += 1
        else:
            items.append(item)
    return Extraction(items, skipped)


def _in_report(resource: JSONObject) -> bool:
    if resource.get("resourceType") != "Observation":
        return True
    return bool(_category_codes(resource) & RESULT_CATEGORIES)


def _condition(resource: JSONObject) -> ClinicalItem | None:
    return _item(
        "problems", resource, resource.get("code"),
        status=_code(resource.get("clinicalStatus")),
        dates=(resource.get("onsetDateTime"), resource.get("recordedDate")),
    )  # fmt: skip


def _medication(resource: JSONObject) -> ClinicalItem | None:
    return _item(
        "medication", resource, resource.get("medicationCodeableConcept"),
        status=_string(resource.get("status")), dates=(resource.get("authoredOn"),),
    )  # fmt: skip


def _allergy(resource: JSONObject) -> ClinicalItem | None:
    return _item(
        "allergies", resource, resource.get("code"),
        status=_code(resource.get("clinicalStatus")),
        dates=(resource.get("onsetDateTime"), resource.get("recordedDate")),
    )  # fmt: skip


def _observation(resource: JSONObject) -> ClinicalItem | None:
    value, unit = _observed(resource)
    period = resource.get("effectivePeriod")
    return _item(
        "results", resource, resource.get("code"),
        status=_string(resource.get("status")),
        dates=(resource.get("effectiveDateTime"), _start(period), resource.get("issued")),
        value=value, unit=unit,
    )  # fmt: skip


def _encounter(resource: JSONObject) -> ClinicalItem | None:
    # R4 requires ``class`` (AMB, EMER, IMP...); an encounter without a type
    # still has that, so no encounter drops out of the report.
    types = resource.get("type")
    concept = types[0] if isinstance(types, list) and types else None
    if _coding(concept) is None:
        concept = {"coding": [resource.get("class")]}
    return _item(
        "encounters", resource, concept,
        status=_string(resource.get("status")), dates=(_start(resource.get("period")),),
    )  # fmt: skip


def _procedure(resource: JSONObject) -> ClinicalItem | None:
    return _item(
        "procedures", resource, resource.get("code"),
        status=_string(resource.get("status")),
        dates=(resource.get("performedDateTime"), _start(resource.get("performedPeriod"))),
    )  # fmt: skip


def _immunisation(resource: JSONObject) -> ClinicalItem | None:
    return _item(
        "immunisations", resource, resource.get("vaccineCode"),
        status=_string(resource.get("status")),
        dates=(resource.get("occurrenceDateTime"), resource.get("recorded")),
    )  # fmt: skip


_READERS: dict[str, Callable[[JSONObject], ClinicalItem | None]] = {
    "Condition": _condition,
    "MedicationRequest": _medication,
    "AllergyIntolerance": _allergy,
    "Observation": _observation,
    "Encounter": _encounter,
    "Procedure": _procedure,
    "Immunization": _immunisation,
}
#: Resource types ``extract`` reads: what the holder asks the store for.
REPORT_TYPES = tuple(_READERS)


def _item(
    section: str,
    resource: JSONObject,
    concept: Any,
    *,
    status: str,
    dates: tuple[Any, ...],
    value: str = "",
    unit: str = "",
) -> ClinicalItem | None:
    coding = _coding(concept)
    if coding is None:
        return None
    system, code, display = coding
    return ClinicalItem(
        section=section,
        code_system=system,
        code=code,
        display=display or concept_text(concept),
        status=status,
        date=_first_date(dates),
        value=value,
        unit=unit,
        resource_id=f"{resource.get('resourceType')}/{resource.get('id')}",
        resource_json=compact_json(resource).encode(),
    )


def _coding(concept: Any) -> tuple[str, str, str] | None:
    """``(system, code, display)``: a known system's coding first, else the first one."""
    codings = concept.get("coding") if isinstance(concept, dict) else None
    if not isinstance(codings, list):
        return None
    usable = [
        (_string(c.get("system")), _string(c.get("code")), _string(c.get("display")))
        for c in codings
        if isinstance(c, dict) and _string(c.get("code"))
    ]
    for system in KNOWN_SYSTEMS:
        for found in usable:
            if found[0] == system:
                return found
    return usable[0] if usable else None


def _observed(resource: JSONObject) -> tuple[str, str]:
    """``(value, unit)`` of an observation as text (module doc: components)."""
    value = _value(resource)
    if value is not None:
        return value
    components = [c for c in resource.get("component") or [] if isinstance(c, dict)]
    components.sort(key=lambda c: _COMPONENTS_FIRST.get(_code(c.get("code")), 2))
    parts = [_value(c) for c in components]
    shown = [p for p in parts if p is not None and p[0]]
    if not shown:
        return "", ""
    units = {unit for _, unit in shown}
    if len(units) == 1:
        return "/".join(v for v, _ in shown), units.pop()
    return " / ".join(f"{v} {u}".strip() for v, u in shown), ""


def _value(element: JSONObject) -> tuple[str, str] | None:
    """The ``value[x]`` of an observation or component as (text, unit); None if absent."""
    quantity = element.get("valueQuantity")
    if isinstance(quantity, dict):
        number = quantity.get("value")
        text = "" if isinstance(number, bool) or number is None else str(number)
        comparator = _string(quantity.get("comparator"))
        unit = _string(quantity.get("unit")) or _string(quantity.get("code"))
        return comparator + text, unit
    concept = element.get("valueCodeableConcept")
    if concept is not None:
        coding = _coding(concept)
        return concept_text(concept) or (coding[2] or coding[1] if coding else ""), ""
    for key in ("valueString", "valueInteger", "valueBoolean"):
        if key in element and isinstance(element[key], str | int | float):
            raw = element[key]
            return (str(raw).lower() if isinstance(raw, bool) else str(raw)), ""
    return None


def _first_date(candidates: tuple[Any, ...]) -> str:
    """The first candidate that is a FHIR date or dateTime, normalised; "" if none."""
    for value in candidates:
        if isinstance(value, str) and value.strip():
            try:
                return normalise_datetime(value)
            except ValueError:
                continue
    return ""


def _start(period: Any) -> Any:
    return period.get("start") if isinstance(period, dict) else None


def _code(concept: Any) -> str:
    coding = _coding(concept)
    return coding[1] if coding else ""


def _category_codes(resource: JSONObject) -> set[str]:
    categories = resource.get("category")
    if not isinstance(categories, list):
        return set()
    return {
        _string(c.get("code"))
        for concept in categories
        if isinstance(concept, dict) and isinstance(concept.get("coding"), list)
        for c in concept["coding"]
        if isinstance(c, dict)
    }


def _string(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""
