"""What a facility offers its peers as documents, built from one bundle.

Peers fetch documents, not FHIR resources, so ingest turns a bundle into:

- every DocumentReference attachment with inline ``data``;
- every DiagnosticReport ``presentedForm`` attachment, unless a
  DocumentReference of the bundle already carries that report (Synthea
  writes each clinical note twice: as the report's presentedForm and as a
  DocumentReference whose identifier is the report's fullUrl);
- an "encounter summary" for each Encounter no DocumentReference points at:
  a FHIR ``collection`` Bundle of the Encounter and everything of the
  bundle recorded in it, so encounters without notes (all of the older
  Synthea exports) still give a clinician something to open.

Document ids derive from the source resource id, so re-ingest replaces a
document instead of adding a second one. Authors are kept as references
(``OrganisationRef``) and named when read: the organisation may arrive in a
bundle loaded later.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from node.categories import categories_of
from node.fhir import (
    JSONObject,
    SerialisedResources,
    compact_json,
    concept_text,
    display_of,
    first_coding,
    normalise_datetime,
    parse_reference,
    reference_of,
    references_in,
)
from node.records import DocumentDraft, OrganisationRef

LOINC = "http://loinc.org"
SUMMARY_CODE = "34133-9"
SUMMARY_DISPLAY = "Summary of episode note"
SUMMARY_CONTENT_TYPE = "application/fhir+json"
DEFAULT_CONTENT_TYPE = "application/octet-stream"

_WHITESPACE = re.compile(rb"\s+")


@dataclass(frozen=True, slots=True)
class Source:
    """One validated resource of the bundle, references already rewritten."""

    label: str  # "entry 12 (DocumentReference)", for error messages
    full_url: str
    resource: JSONObject
    patient_fhir_id: str | None

    @property
    def key(self) -> str:
        return f"{self.resource['resourceType']}/{self.resource['id']}"


@dataclass(frozen=True, slots=True)
class DocumentsFound:
    documents: list[DocumentDraft]
    skipped: list[str]


def build_documents(
    sources: Sequence[Source], serialised: SerialisedResources | None = None
) -> DocumentsFound:
    """Every document the bundle offers; raises ValueError on a broken attachment.

    ``serialised`` gives each resource's JSON; pass the one the caller stores
    resources with, so a summary does not serialise them a second time.
    """
    serialised = serialised or SerialisedResources()
    by_key = {source.key: source for source in sources}
    members = _encounter_members(sources)
    documents: list[DocumentDraft] = []
    skipped: list[str] = []
    noted_encounters: set[str] = set()
    noted_reports: set[str] = set()
    for source in sources:
        if source.resource["resourceType"] == "DocumentReference":
            context = source.resource.get("context")
            if isinstance(context, dict):
                noted_encounters.update(references_in(context.get("encounter")))
                noted_reports.update(references_in(context.get("related")))
            noted_reports.update(_identifier_values(source.resource))
    for source in sources:
        kind = source.resource["resourceType"]
        if source.patient_fhir_id is None:
            if kind in ("DocumentReference", "DiagnosticReport", "Encounter"):
                skipped.append(f"{source.key}: not linked to a patient of this bundle")
            continue
        if kind == "DocumentReference":
            documents.extend(_reference_documents(source, by_key, members, skipped))
        elif kind == "DiagnosticReport":
            if source.full_url in noted_reports or source.key in noted_reports:
                continue
            documents.extend(_report_documents(source, by_key))
    documents.extend(_encounter_summaries(sources, members, noted_encounters, serialised))
    return DocumentsFound(documents, skipped)


def _encounter_members(sources: Sequence[Source]) -> dict[str, list[JSONObject]]:
    """Encounter key -> the resources recorded in it."""
    members: dict[str, list[JSONObject]] = defaultdict(list)
    for source in sources:
        for encounter in _encounters_of(source.resource):
            members[encounter].append(source.resource)
    return members


def _reference_documents(
    source: Source,
    by_key: dict[str, Source],
    members: dict[str, list[JSONObject]],
    skipped: list[str],
) -> Iterable[DocumentDraft]:
    resource = source.resource
    contents = resource.get("content")
    if not isinstance(contents, list):
        skipped.append(f"{source.key}: no content")
        return
    type_system, type_code, type_display = first_coding(resource.get("type"))
    description = resource.get("description")
    base_title = (
        description.strip() if isinstance(description, str) and description.strip() else ""
    ) or concept_text(resource.get("type"))
    context = resource.get("context")
    encounter_refs = references_in(context.get("encounter")) if isinstance(context, dict) else []
    # A note tells what its encounter recorded: it carries those categories too.
    categories = categories_of(
        [resource]
        + [r for ref in encounter_refs for r in members.get(ref, [])]
        + [by_key[ref].resource for ref in encounter_refs if ref in by_key]
    ) - {"encounters"}
    for number, content in enumerate(contents):
        attachment = content.get("attachment") if isinstance(content, dict) else None
        where = f"{source.label}: content {number}"
        if not isinstance(attachment, dict) or not isinstance(attachment.get("data"), str):
            skipped.append(f"{source.key}: content {number} has no inline data")
            continue
        data = _decode(attachment["data"], where)
        created = _first_datetime(
            where,
            resource.get("date"),
            _start_of(context.get("period")) if isinstance(context, dict) else None,
            attachment.get("creation"),
        )
        title = _text(attachment.get("title")) or base_title or "Document"
        author = _organisation(resource.get("custodian"))
        if author is None:
            author = _encounter_provider(encounter_refs, by_key)
        yield _draft(
            document_id=source.key if number == 0 else f"{source.key}/{number}",
            source=source,
            title=title,
            coding=(type_system, type_code, type_display),
            content_type=_text(attachment.get("contentType")) or DEFAULT_CONTENT_TYPE,
            content=data,
            created=created,
            author=author or OrganisationRef(),
            categories=categories,
        )


def _report_documents(source: Source, by_key: dict[str, Source]) -> Iterable[DocumentDraft]:
    resource = source.resource
    forms = resource.get("presentedForm")
    if not isinstance(forms, list):
        return
    coding = first_coding(resource.get("code"))
    effective = resource.get("effectivePeriod")
    author = None
    for performer in references_in(resource.get("performer")):
        author = _organisation({"reference": performer}, only_organisation=True)
        if author is not None:
            break
    if author is None:
        author = _encounter_provider([reference_of(resource.get("encounter"))], by_key)
    for number, attachment in enumerate(forms):
        if not isinstance(attachment, dict) or not isinstance(attachment.get("data"), str):
            continue
        where = f"{source.label}: presentedForm {number}"
        yield _draft(
            document_id=source.key if number == 0 else f"{source.key}/{number}",
            source=source,
            title=_text(attachment.get("title")) or concept_text(resource.get("code")) or "Report",
            coding=coding,
            content_type=_text(attachment.get("contentType")) or DEFAULT_CONTENT_TYPE,
            content=_decode(attachment["data"], where),
            created=_first_datetime(
                where,
                resource.get("issued"),
                resource.get("effectiveDateTime"),
                effective.get("start") if isinstance(effective, dict) else None,
            ),
            author=author or OrganisationRef(),
            categories=categories_of([resource]),
        )


def _encounter_summaries(
    sources: Sequence[Source],
    members: dict[str, list[JSONObject]],
    noted_encounters: set[str],
    serialised: SerialisedResources,
) -> Iterable[DocumentDraft]:
    for source in sources:
        resource = source.resource
        if resource["resourceType"] != "Encounter" or source.patient_fhir_id is None:
            continue
        if source.key in noted_encounters or source.full_url in noted_encounters:
            continue
        start = _start_of(resource.get("period"))
        kind = concept_text(resource.get("type")) or _class_code(resource) or "encounter"
        content = _collection(
            f"encounter-summary-{resource['id']}",
            [serialised(item) for item in [resource, *members.get(source.key, [])]],
        )
        yield _draft(
            document_id=f"{source.key}/summary",
            source=source,
            title=f"Encounter summary: {kind}",
            coding=(LOINC, SUMMARY_CODE, SUMMARY_DISPLAY),
            content_type=SUMMARY_CONTENT_TYPE,
            content=content,
            created=_first_datetime(f"{source.label}: period.start", start),
            author=_organisation(resource.get("serviceProvider")) or OrganisationRef(),
            categories=categories_of([resource, *members.get(source.key, [])]),
        )


def _start_of(period: Any) -> Any:
    """A FHIR Period's start; None when the period is not an object."""
    return period.get("start") if isinstance(period, dict) else None


def _collection(bundle_id: str, resources: Sequence[str]) -> bytes:
    """A ``collection`` Bundle of already serialised resources, as ``compact_json`` writes it."""
    entries = ",".join(f'{{"resource":{text}}}' for text in resources)
    head = f'{{"resourceType":"Bundle","id":{compact_json(bundle_id)},"type":"collection"'
    return f'{head},"entry":[{entries}]}}'.encode()


def _encounters_of(resource: JSONObject) -> set[str]:
    """The encounters a resource was recorded in (R4 spells this several ways)."""
    found = set(references_in(resource.get("encounter")))
    context = resource.get("context")
    if isinstance(context, dict):  # DocumentReference.context.encounter
        found.update(references_in(context.get("encounter")))
    found.update(references_in(context))  # ChargeItem.context is the Reference itself
    if resource["resourceType"] in ("Claim", "ExplanationOfBenefit"):
        items = resource.get("item")
        if isinstance(items, list):
            for item in items:
                if isinstance(item, dict):
                    found.update(references_in(item.get("encounter")))
    return {ref for ref in found if ref.startswith("Encounter/")}


def _encounter_provider(refs: Sequence[str], by_key: dict[str, Source]) -> OrganisationRef | None:
    for ref in refs:
        encounter = by_key.get(ref)
        if encounter is not None:
            return _organisation(encounter.resource.get("serviceProvider"))
    return None


def _organisation(value: Any, only_organisation: bool = False) -> OrganisationRef | None:
    """The reference as an ``OrganisationRef``, None when there is nothing to name."""
    ref = reference_of(value)
    display = display_of(value)
    parsed = parse_reference(ref, "Organization") if ref else None
    if parsed is not None and only_organisation and parsed.resource_type != "Organization":
        return None
    if parsed is None:
        return OrganisationRef(display=display) if display and not only_organisation else None
    return OrganisationRef(
        resource_type=parsed.resource_type,
        fhir_id=parsed.fhir_id,
        system=parsed.system,
        value=parsed.value,
        display=display,
    )


def _draft(
    *,
    document_id: str,
    source: Source,
    title: str,
    coding: tuple[str, str, str],
    content_type: str,
    content: bytes,
    created: str,
    author: OrganisationRef,
    categories: frozenset[str],
) -> DocumentDraft:
    assert source.patient_fhir_id is not None
    return DocumentDraft(
        document_id=document_id,
        patient_fhir_id=source.patient_fhir_id,
        source=source.key,
        title=title,
        type_system=coding[0],
        type_code=coding[1],
        type_display=coding[2],
        content_type=content_type,
        content=content,
        created=created,
        author=author,
        size=len(content),
        sha256=hashlib.sha256(content).hexdigest(),
        categories=categories,
    )


def _decode(data: str, where: str) -> bytes:
    try:
        return base64.b64decode(_WHITESPACE.sub(b"", data.encode("ascii")), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise ValueError(f"{where}: attachment data is not base64") from None


def _first_datetime(where: str, *candidates: Any) -> str:
    """The first present date among ``candidates``, normalised; "" when none is."""
    for value in candidates:
        if isinstance(value, str) and value.strip():
            try:
                return normalise_datetime(value)
            except ValueError:
                raise ValueError(f"{where}: {value!r} is not a FHIR date-time") from None
    return ""


def _identifier_values(resource: JSONObject) -> list[str]:
    identifiers = resource.get("identifier")
    if not isinstance(identifiers, list):
        return []
    return [
        item["value"]
        for item in identifiers
        if isinstance(item, dict) and isinstance(item.get("value"), str)
    ]


def _class_code(resource: JSONObject) -> str:
    encounter_class = resource.get("class")
    if isinstance(encounter_class, dict):
        return _text(encounter_class.get("display")) or _text(encounter_class.get("code"))
    return ""


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""
