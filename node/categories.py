"""Which kinds of data a resource, and so a document, holds.

A patient can deny one kind of data ("no mental-health data", "no
medication") while permitting the rest. A document belongs to every
category of the data it carries: its own kind (a note, an encounter
summary) and the categories of the resources recorded in its encounter,
so a deny removes exactly the documents that would show that data.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

#: Every data category a consent can name.
DATA_CATEGORIES = (
    "medication",
    "lab-results",
    "problems",
    "allergies",
    "imaging",
    "mental-health",
    "notes",
    "encounters",
)

SNOMED = "http://snomed.info/sct"
#: SNOMED CT conditions treated as mental-health data (depression, anxiety,
#: psychosis, substance use, eating and personality disorders, suicidality).
MENTAL_HEALTH_CODES = frozenset(
    {
        "35489007", "370143000", "36923009", "66590003", "197480006", "21897009",
        "80583007", "58214004", "69322001", "13746004", "191736004", "44054006",
        "7200002", "66214007", "191816009", "5602001", "72366004", "56882008",
        "33449004", "225444004", "82313006", "47505003", "6471006", "267062003",
        "230690007", "10743008", "399153001", "26929004", "79823003",
    }
)  # fmt: skip
_RADIOLOGY = ("RAD", "LP29684-5", "18748-4", "imaging")


def resource_categories(resource: dict[str, Any]) -> set[str]:
    """The data categories one FHIR resource carries."""
    kind = resource.get("resourceType")
    if kind in ("MedicationRequest", "MedicationStatement", "MedicationAdministration",
                "MedicationDispense"):  # fmt: skip
        return {"medication"}
    if kind == "AllergyIntolerance":
        return {"allergies"}
    if kind == "Condition":
        return {"problems", "mental-health"} if _mental_health(resource) else {"problems"}
    if kind == "ImagingStudy":
        return {"imaging"}
    if kind == "DiagnosticReport":
        return (
            {"imaging"} if _codes_include(resource.get("category"), _RADIOLOGY) else {"lab-results"}
        )
    if kind == "Observation" and _codes_include(resource.get("category"), ("laboratory",)):
        return {"lab-results"}
    if kind == "DocumentReference":
        return {"notes"}
    if kind == "Encounter":
        return {"encounters"} | (
            {"mental-health"}
            if _codes_in(resource.get("reasonCode"), MENTAL_HEALTH_CODES)
            else set()
        )
    return set()


def categories_of(resources: Iterable[dict[str, Any]]) -> frozenset[str]:
    found: set[str] = set()
    for resource in resources:
        found |= resource_categories(resource)
    return frozenset(found)


def _mental_health(condition: dict[str, Any]) -> bool:
    return _codes_in([condition.get("code")], MENTAL_HEALTH_CODES)


def _codings(concepts: Any) -> Iterable[dict[str, Any]]:
    if isinstance(concepts, dict):
        concepts = [concepts]
    if not isinstance(concepts, list):
        return
    for concept in concepts:
        if isinstance(concept, dict) and isinstance(concept.get("coding"), list):
            yield from (c for c in concept["coding"] if isinstance(c, dict))


def _codes_in(concepts: Any, codes: frozenset[str]) -> bool:
    return any(c.get("system") == SNOMED and c.get("code") in codes for c in _codings(concepts))


def _codes_include(concepts: Any, codes: tuple[str, ...]) -> bool:
    return any(c.get("code") in codes for c in _codings(concepts))
