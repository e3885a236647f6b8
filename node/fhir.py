"""The little of FHIR R4 the node needs to read: references, dates, codes, names.

Kept apart from ingest so the rules for the awkward shapes in real exports
(``urn:uuid:`` references, conditional references, three date-time shapes)
live in one place with their own tests, and nothing here touches the store.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

JSONObject = dict[str, Any]

#: FHIR ``id``: 1-64 of letters, digits, "-" and ".".
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_TYPE = re.compile(r"[A-Z][A-Za-z]{1,63}")
_LITERAL = re.compile(
    r"(?:.*/)?(?P<type>[A-Z][A-Za-z]{1,63})/(?P<id>[A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?"
)
_PARTIAL_DATE = re.compile(r"\d{4}(?:-\d{2}(?:-\d{2})?)?")
_URN_UUID = "urn:uuid:"


def compact_json(value: Any) -> str:
    """``value`` as JSON without spaces, non-ASCII kept: how resources are stored."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class SerialisedResources:
    """Each resource's compact JSON, made once per bundle.

    An encounter summary repeats the JSON of every resource recorded in the
    encounter, which the store also keeps on its own: serialising each only
    once saves a fifth of an ingest's CPU.
    """

    def __init__(self) -> None:
        # Keyed by id(); the resource is kept beside its text so the id stays its own.
        self._texts: dict[int, tuple[JSONObject, str]] = {}

    def __call__(self, resource: JSONObject) -> str:
        found = self._texts.get(id(resource))
        if found is None:
            found = self._texts[id(resource)] = (resource, compact_json(resource))
        return found[1]


def is_fhir_id(value: object) -> bool:
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def is_resource_type(value: object) -> bool:
    return isinstance(value, str) and _TYPE.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class Reference:
    """A reference reduced to what can be looked up in the store.

    Literal references have ``fhir_id``; conditional ones
    (``Organization?identifier=system|value``) have ``system`` and ``value``
    and are resolved when read, through the identifiers of stored resources.
    """

    resource_type: str
    fhir_id: str = ""
    system: str = ""
    value: str = ""

    @property
    def conditional(self) -> bool:
        return not self.fhir_id


def parse_reference(text: str, expected_type: str = "") -> Reference | None:
    """The lookup form of a reference, or None for one we cannot look up.

    ``urn:uuid:X`` that ingest could not rewrite (the target was not in
    the bundle) is taken as ``expected_type/X``: Synthea and most exporters
    use the UUID as the resource id, so the target may still arrive in a
    later bundle. Contained (``#x``) references give None.
    """
    text = text.strip()
    if not text or text.startswith("#"):
        return None
    if text.startswith(_URN_UUID):
        uuid = text[len(_URN_UUID) :]
        if expected_type and is_fhir_id(uuid):
            return Reference(expected_type, fhir_id=uuid)
        return None
    if "?" in text:
        resource_type, _, query = text.partition("?")
        token = conditional_identifier(query)
        if is_resource_type(resource_type) and token is not None:
            return Reference(resource_type, system=token[0], value=token[1])
        return None
    match = _LITERAL.fullmatch(text)
    if match is None:
        return None
    return Reference(match["type"], fhir_id=match["id"])


def conditional_identifier(query: str) -> tuple[str, str] | None:
    """``(system, value)`` of an ``identifier=system|value`` search, else None.

    Used both for conditional references and for ``request.ifNoneExist``.
    """
    for param in query.split("&"):
        name, _, token = param.partition("=")
        if name != "identifier":
            continue
        system, bar, value = unquote(token).partition("|")
        if bar and system and value:
            return system, value
    return None


def rewrite_references(node: Any, mapping: Mapping[str, str]) -> None:
    """Replace every ``reference`` found in ``mapping``, in place.

    This is what a FHIR server does with a transaction's ``urn:uuid:``
    fullUrls: afterwards the stored JSON says ``Patient/123``. References
    not in the mapping (conditional, contained, dangling) stay as they are.
    """
    if isinstance(node, dict):
        ref = node.get("reference")
        if isinstance(ref, str):
            target = mapping.get(ref)
            if target is not None:
                node["reference"] = target
        for value in node.values():
            if isinstance(value, dict | list):
                rewrite_references(value, mapping)
    elif isinstance(node, list):
        for value in node:
            if isinstance(value, dict | list):
                rewrite_references(value, mapping)


def reference_of(value: Any) -> str:
    """The ``reference`` string of a Reference element, or ""."""
    if isinstance(value, dict):
        ref = value.get("reference")
        if isinstance(ref, str):
            return ref
    return ""


def references_in(value: Any) -> list[str]:
    """Reference strings of a Reference or a list of them (R4 varies by field)."""
    items = value if isinstance(value, list) else [value]
    return [ref for item in items if (ref := reference_of(item))]


def display_of(value: Any) -> str:
    if isinstance(value, dict):
        display = value.get("display")
        if isinstance(display, str):
            return display.strip()
    return ""


def normalise_datetime(text: str) -> str:
    """A FHIR date or dateTime as sortable ISO 8601; raises ValueError.

    Partial dates (``2001``, ``2001-03``, ``2001-03-29``) stay as they are.
    Date-times (with or without milliseconds, any offset) become UTC to the
    second, so that "newest first" is a plain string sort.
    """
    text = text.strip()
    if _PARTIAL_DATE.fullmatch(text):
        return text
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        return moment.isoformat(timespec="seconds")
    return moment.astimezone(UTC).isoformat(timespec="seconds")


def is_date(text: object) -> bool:
    """True for a full FHIR ``date`` (YYYY-MM-DD) or a partial one."""
    return isinstance(text, str) and _PARTIAL_DATE.fullmatch(text) is not None


def first_coding(concept: Any) -> tuple[str, str, str]:
    """``(system, code, display)`` of the first coding of a CodeableConcept."""
    if isinstance(concept, dict):
        codings = concept.get("coding")
        if isinstance(codings, list):
            for coding in codings:
                if isinstance(coding, dict):
                    return (
                        _text(coding.get("system")),
                        _text(coding.get("code")),
                        _text(coding.get("display")),
                    )
    return "", "", ""


def concept_text(concept: Any) -> str:
    """What a person would call a CodeableConcept: its text, else a display."""
    if isinstance(concept, list):
        concept = concept[0] if concept else None
    if not isinstance(concept, dict):
        return ""
    text = _text(concept.get("text"))
    return text or first_coding(concept)[2]


def human_name(names: Any) -> tuple[str, str]:
    """``(family, given)`` of the official name, else the usual, else the first."""
    if not isinstance(names, list):
        return "", ""
    candidates = [name for name in names if isinstance(name, dict)]
    for use in ("official", "usual", None):
        for name in candidates:
            if use is None or name.get("use") == use:
                given = name.get("given")
                given_text = (
                    " ".join(g.strip() for g in given if isinstance(g, str))
                    if isinstance(given, list)
                    else ""
                )
                return _text(name.get("family")), given_text
    return "", ""


def label_of(resource: JSONObject) -> str | None:
    """The name a shared resource is shown by (organisation, location, practitioner)."""
    name = resource.get("name")
    if isinstance(name, str):
        return name.strip() or None
    if isinstance(name, list):
        family, given = human_name(name)
        text = f"{given} {family}".strip()
        return text or None
    return None


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""
