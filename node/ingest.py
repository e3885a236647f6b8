"""Ingest of FHIR R4 bundle files into the node store.

A file goes through two steps:

1. ``prepare_bundle`` (in a worker thread or, for many files, worker
   processes: ``node.preparer``; parsing 4 MB of JSON must not stall the
   event loop) reads and validates the *whole* bundle, rewrites
   ``urn:uuid:`` references to ``Type/id`` as a FHIR server would, finds
   each patient's national identifier and pseudonym, and builds the
   documents. Any problem raises ``InvalidBundle`` naming the file and the
   entry; nothing has been written yet.
2. ``NodeStore.write_bundle`` writes it in one transaction: the bundle is
   in completely or not at all, and re-ingest upserts (type + id), so a
   file loaded twice adds nothing.

What is *not* an error: references to resources that are not there
(a facility holds only part of a patient's record), conditional references
(``Organization?identifier=...``, resolved when read, so bundle order does
not matter) and contained references (``#referral``).

Patient names and identifiers are never logged above DEBUG. Synthea names
files after the patient, so file names are logged at DEBUG too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import stat
import time
from collections import deque
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path
from typing import Any

from node.documents import Source, build_documents
from node.fhir import (
    JSONObject,
    SerialisedResources,
    conditional_identifier,
    human_name,
    is_date,
    is_fhir_id,
    is_resource_type,
    label_of,
    parse_reference,
    reference_of,
    rewrite_references,
)
from node.preparer import BundlePreparer
from node.records import BundleDraft, IngestReport, PatientDraft, ResourceDraft
from node.store import NodeStore
from transmural.errors import InvalidBundle, InvalidIdentifier, InvalidInput
from transmural.identifiers import Identifier, canonical, canonical_system
from transmural.pseudonym import Pseudonymiser

log = logging.getLogger(__name__)

INGESTED_TYPES = frozenset({"transaction", "batch", "collection", "document"})
#: Resources no one patient owns: stored once, shared by every record.
SHARED_TYPES = frozenset(
    {
        "Organization",
        "Practitioner",
        "PractitionerRole",
        "Location",
        "HealthcareService",
        "Endpoint",
        "Medication",
        "Substance",
    }
)
#: Larger files are refused before they are parsed (Synthea's largest is 4 MB).
MAX_BUNDLE_BYTES = 256 * 1024 * 1024
#: Longest integer a bundle may hold: FHIR's are 32 or 64 bits, its decimals a few dozen digits.
MAX_INTEGER_DIGITS = 100
#: How far into a file ``ingest_folder`` looks for the bundle type.
_SNIFF_BYTES = 16 * 1024
_SNIFF_TYPE = re.compile(r'"type"\s*:\s*"([a-z-]+)"')
_LONG_NUMBER = re.compile(r"\d{5,}")


async def ingest_file(
    store: NodeStore,
    path: Path | str,
    pseudonymiser: Pseudonymiser | None,
    national_system: str,
) -> IngestReport:
    """Ingest one bundle file; raises ``InvalidBundle`` and leaves the store unchanged."""
    path = Path(path)
    system = _national(national_system)
    started = time.perf_counter()
    draft = await asyncio.to_thread(prepare_bundle, path, system, pseudonymiser)
    return await _write(store, draft, started)


async def ingest_folder(
    store: NodeStore,
    folder: Path | str,
    pseudonymiser: Pseudonymiser | None,
    national_system: str,
) -> tuple[list[IngestReport], list[InvalidBundle]]:
    """Ingest every ``*.json`` bundle of ``folder``: batch (provider) bundles first.

    Returns the reports of the files ingested and the errors of those
    refused, each in load order: a refused file does not stop the others,
    and a CLI prints each error (it names the file) and exits non-zero.
    """
    files = bundle_files(Path(folder))
    reports: list[IngestReport] = []
    errors: list[InvalidBundle] = []
    started = time.perf_counter()
    async with contextlib.aclosing(
        ingest_each(store, files, pseudonymiser, national_system)
    ) as results:
        async for _, result in results:
            if isinstance(result, InvalidBundle):
                errors.append(result)
            else:
                reports.append(result)
    log.info(
        "ingested %d of %d bundles in %.1f s: %d patients, %d resources, %d documents",
        len(reports),
        len(files),
        time.perf_counter() - started,
        sum(r.patients for r in reports),
        sum(r.resources for r in reports),
        sum(r.documents for r in reports),
    )
    return reports, errors


async def ingest_each(
    store: NodeStore,
    files: Sequence[Path],
    pseudonymiser: Pseudonymiser | None,
    national_system: str,
    workers: int | None = None,
) -> AsyncGenerator[tuple[Path, IngestReport | InvalidBundle]]:
    """Ingest ``files`` in order, yielding each with its report or why it was refused.

    The next files are prepared (``BundlePreparer``: on other cores when
    there are many) while the current one is written; each is written in
    its own transaction, so stopping half-way leaves whole bundles only.
    Close the generator (``contextlib.aclosing``) if you stop early.
    ``workers`` overrides how many worker processes prepare (0: a thread).
    """
    system = _national(national_system)
    async with BundlePreparer(len(files), workers) as preparer:
        pending: deque[tuple[Path, asyncio.Future[BundleDraft]]] = deque()
        upcoming = iter(files)
        try:
            while True:
                while len(pending) < preparer.ahead and (path := next(upcoming, None)) is not None:
                    pending.append((path, preparer.prepare(path, system, pseudonymiser)))
                if not pending:
                    return
                path, preparing = pending.popleft()
                started = time.perf_counter()
                try:
                    draft = await preparing
                    # Some refusals show only against what is stored (a national
                    # identifier another patient has): the transaction rolls back.
                    written: IngestReport | InvalidBundle = await _write(store, draft, started)
                except InvalidBundle as error:
                    log.debug("refused %s", error)
                    written = error
                yield path, written
        finally:
            for _, preparing in pending:
                preparing.cancel()


def bundle_files(folder: Path) -> list[Path]:
    """The folder's bundles in load order: ``batch`` bundles, then the rest, by name.

    Provider bundles (Synthea's ``hospitalInformation*``) are ``batch``
    bundles of conditional creates; loading them first is what a FHIR server
    needs. This store resolves conditional references when read, so order
    only matters for ``ifNoneExist``; the type is sniffed from the start of
    the file, and a file whose type comes after its entries sorts with the rest.
    """
    if not folder.is_dir():
        raise InvalidInput(f"{folder} is not a folder")
    files = sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() == ".json" and not p.name.startswith(".") and not p.is_dir()
    )
    if not files:
        raise InvalidInput(f"{folder} holds no *.json bundles")
    batch = {p for p in files if _sniff_type(p) == "batch"}
    return [p for p in files if p in batch] + [p for p in files if p not in batch]


def prepare_bundle(
    path: Path, national_system: str, pseudonymiser: Pseudonymiser | None
) -> BundleDraft:
    """Read, validate and convert one bundle file (blocking: run it in a thread).

    Every problem is an ``InvalidBundle`` naming the file: the checks below
    name most; a shape they did not foresee (a list where FHIR has an
    object, say) is refused as such rather than ending the whole ingest.
    """
    try:
        return _prepare(path, national_system, pseudonymiser)
    except (TypeError, AttributeError, KeyError, IndexError, ValueError) as error:
        if isinstance(error, InvalidInput):  # InvalidBundle, InvalidIdentifier: already said
            raise
        log.debug("refused %s: %r", path.name, error)
        raise InvalidBundle(
            f"{path.name}: not FHIR this node can read: a value of an unexpected type or shape "
            f"({type(error).__name__})"
        ) from None


def _prepare(path: Path, national_system: str, pseudonymiser: Pseudonymiser | None) -> BundleDraft:
    name = path.name
    bundle = _load(path)
    kind = bundle.get("resourceType")
    if kind != "Bundle":
        raise InvalidBundle(f'{name}: resourceType is {_shown(kind)}, not "Bundle"')
    bundle_type = bundle.get("type")
    if not isinstance(bundle_type, str) or bundle_type not in INGESTED_TYPES:
        raise InvalidBundle(
            f"{name}: Bundle type {_shown(bundle_type)} is not one we ingest "
            f"({', '.join(sorted(INGESTED_TYPES))})"
        )
    entries = bundle.get("entry")
    if not isinstance(entries, list):
        raise InvalidBundle(f'{name}: the Bundle has no "entry" list')
    sources, conditions = _entries(name, entries)
    mapping = {s.full_url: s.key for s in sources if s.full_url}
    if mapping:
        for source in sources:
            rewrite_references(source.resource, mapping)
    patients = [
        _patient(name, source, national_system, pseudonymiser)
        for source in sources
        if source.resource["resourceType"] == "Patient"
    ]
    patient_ids = [p.fhir_id for p in patients]
    sources = [
        Source(s.label, s.full_url, s.resource, _owner(s.resource, patient_ids)) for s in sources
    ]
    serialised = SerialisedResources()
    try:
        found = build_documents(sources, serialised)
    except ValueError as error:
        raise InvalidBundle(f"{name}: {error}") from None
    resources = [
        ResourceDraft(
            resource_type=s.resource["resourceType"],
            fhir_id=s.resource["id"],
            patient_fhir_id=s.patient_fhir_id,
            json=serialised(s.resource),
            label=label_of(s.resource) if s.resource["resourceType"] in SHARED_TYPES else None,
            identifiers=_identifier_pairs(s.resource),
            if_none_exist=condition,
        )
        for s, condition in zip(sources, conditions, strict=True)
    ]
    return BundleDraft(
        file=name,
        patients=patients,
        resources=resources,
        documents=found.documents,
        skipped=found.skipped,
        pseudonymised=pseudonymiser is not None,
    )


def _load(path: Path) -> JSONObject:
    name = path.name
    try:
        # Non-blocking: opening a FIFO would otherwise wait for a writer. A
        # FIFO or a device is no bundle (reading one may never end), checked
        # on the opened file so that a swap after a check is caught too.
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise InvalidBundle(f"{name}: not a regular file")
            raw = handle.read(MAX_BUNDLE_BYTES + 1)
    except OSError as error:
        raise InvalidBundle(f"{name}: cannot be read: {error.strerror}") from None
    if len(raw) > MAX_BUNDLE_BYTES:
        raise InvalidBundle(f"{name}: larger than {MAX_BUNDLE_BYTES} bytes")
    try:
        # Decoded here: json.loads on bytes would take a UTF-16 or UTF-32 file
        # for JSON too, where FHIR JSON is UTF-8 (a UTF-8 byte order mark is let go).
        text = raw.decode("utf-8-sig")
        bundle = json.loads(
            text, parse_constant=_no_constant, parse_float=_finite, parse_int=_integer
        )
    except UnicodeDecodeError:
        raise InvalidBundle(f"{name}: not JSON: not UTF-8 text") from None
    except json.JSONDecodeError as error:
        raise InvalidBundle(
            f"{name}: not JSON: {error.msg} at line {error.lineno} column {error.colno}"
        ) from None
    except RecursionError:
        raise InvalidBundle(f"{name}: not JSON we accept: nested too deep") from None
    except ValueError as error:
        # Our limits: NaN, Infinity, 1e999, integers too long.
        raise InvalidBundle(f"{name}: not JSON we accept: {error}") from None
    if not isinstance(bundle, dict):
        raise InvalidBundle(f"{name}: not a JSON object (a FHIR Bundle is one)")
    return bundle


def _no_constant(name: str) -> float:
    """``json.loads``' hook for NaN and Infinity: JSON has no such numbers, nor FHIR."""
    raise ValueError(f"{name} is not a JSON number")


def _integer(text: str) -> int:
    """``json.loads``' hook for integers: refuse one too long to mean anything, in our words
    (Python's own refusal, past 4,300 digits, tells the reader to change an interpreter limit)."""
    digits = len(text.lstrip("-"))
    if digits > MAX_INTEGER_DIGITS:
        raise ValueError(f"an integer of {digits} digits (at most {MAX_INTEGER_DIGITS})")
    return int(text)


def _finite(text: str) -> float:
    """``json.loads``' hook for decimals: one too large for a float is refused, not stored
    as Infinity (which ``json.dumps`` would write back as invalid JSON)."""
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"the number {text[:20]}{'...' if len(text) > 20 else ''} is too large")
    return value


def _entries(name: str, entries: list[Any]) -> tuple[list[Source], list[tuple[str, str] | None]]:
    """Check every entry; the resources with labels and their ifNoneExist conditions."""
    sources: list[Source] = []
    conditions: list[tuple[str, str] | None] = []
    seen: dict[str, int] = {}
    full_urls: dict[str, int] = {}
    for index, entry in enumerate(entries):
        where = f"{name}: entry {index}"
        if not isinstance(entry, dict):
            raise InvalidBundle(f"{where}: not an object")
        resource = entry.get("resource")
        if not isinstance(resource, dict):
            raise InvalidBundle(f'{where}: no "resource"')
        kind = resource.get("resourceType")
        if not is_resource_type(kind):
            raise InvalidBundle(f'{where}: no "resourceType"')
        where = f"{where} ({kind})"
        fhir_id = resource.get("id")
        if fhir_id is None:
            raise InvalidBundle(f'{where}: no "id"')
        if not is_fhir_id(fhir_id):
            raise InvalidBundle(f'{where}: "id" is not a FHIR id (1-64 of A-Z a-z 0-9 - .)')
        key = f"{kind}/{fhir_id}"
        if key in seen:
            raise InvalidBundle(f"{where}: {key} is also entry {seen[key]}")
        seen[key] = index
        full_url = entry.get("fullUrl", "")
        if not isinstance(full_url, str):
            raise InvalidBundle(f'{where}: "fullUrl" is not a string')
        if full_url in full_urls:
            raise InvalidBundle(f"{where}: its fullUrl is also that of entry {full_urls[full_url]}")
        if full_url:
            full_urls[full_url] = index
        conditions.append(_request(where, entry.get("request")))
        sources.append(Source(f"entry {index} ({kind})", full_url, resource, None))
    return sources, conditions


def _request(where: str, request: Any) -> tuple[str, str] | None:
    """The ``ifNoneExist`` identifier of an entry's request, after checking the method."""
    if request is None:
        return None
    if not isinstance(request, dict):
        raise InvalidBundle(f'{where}: "request" is not an object')
    method = request.get("method")
    if method not in (None, "POST", "PUT"):
        raise InvalidBundle(
            f"{where}: request method {_shown(method)} is not supported (only POST and PUT)"
        )
    condition = request.get("ifNoneExist")
    if isinstance(condition, str):
        return conditional_identifier(condition.lstrip("?"))
    return None


def _patient(
    name: str, source: Source, national_system: str, pseudonymiser: Pseudonymiser | None
) -> PatientDraft:
    resource = source.resource
    where = f"{name}: {source.label}"
    national: Identifier | None = None
    identifiers: list[tuple[str, str]] = []
    items = resource.get("identifier")
    if items is not None and not isinstance(items, list):
        raise InvalidBundle(f'{where}: "identifier" is not a list')
    for item in items or []:
        _check_identifier_shape(where, item)
        pair = _pair(item)
        if pair is None:
            continue
        try:
            system = canonical_system(pair[0])
        except InvalidIdentifier:
            continue
        if system != national_system:
            try:
                identifiers.append(_token(canonical(*pair)))
            except InvalidIdentifier:
                identifiers.append(pair)
            continue
        try:
            identifier = canonical(*pair)
        except InvalidIdentifier as error:
            raise InvalidBundle(
                f"{where}: invalid {national_system} identifier: {_redacted(error)}"
            ) from None
        identifiers.append(_token(identifier))
        if national is None and item.get("use") != "old":
            national = identifier
    birth_date = resource.get("birthDate", "")
    if not is_date(birth_date) and birth_date != "":
        raise InvalidBundle(f'{where}: "birthDate" is not a FHIR date')
    gender = resource.get("gender", "")
    family, given = human_name(resource.get("name"))
    return PatientDraft(
        fhir_id=resource["id"],
        identifier=national,
        pseudonym=pseudonymiser.pseudonym(national) if pseudonymiser and national else None,
        family=family,
        given=given,
        birth_date=birth_date,
        gender=gender if isinstance(gender, str) else "",
        identifiers=tuple(dict.fromkeys(identifiers)),
    )


def _check_identifier_shape(where: str, item: Any) -> None:
    """A patient's identifier in another shape than FHIR's (a BSN as a JSON number, say)
    would be passed over, and the patient stored where no one can find them: refuse it."""
    if not isinstance(item, dict):
        raise InvalidBundle(f"{where}: an identifier is not a JSON object")
    for key in ("system", "value"):
        if key in item and not isinstance(item[key], str):
            raise InvalidBundle(f'{where}: an identifier\'s "{key}" is not a JSON string')


def _owner(resource: JSONObject, patients: Sequence[str]) -> str | None:
    """FHIR id of the patient whose record ``resource`` is part of, None if shared."""
    kind = resource["resourceType"]
    if kind == "Patient":
        return str(resource["id"])
    if kind in SHARED_TYPES:
        return None
    for field in ("subject", "patient", "beneficiary"):
        ref = reference_of(resource.get(field))
        if not ref:
            continue
        target = parse_reference(ref, "Patient")
        if target is not None and target.resource_type != "Patient":
            return None  # about a group, a location, a device: no one patient's
        if target is not None and not target.conditional:
            return target.fhir_id
        break
    return patients[0] if len(patients) == 1 else None


def _identifier_pairs(resource: JSONObject) -> tuple[tuple[str, str], ...]:
    """Identifiers as stored for conditional-reference lookups, trimmed and de-duplicated."""
    items = resource.get("identifier")
    if isinstance(items, dict):  # a few resources have one identifier, not a list
        items = [items]
    if not isinstance(items, list):
        return ()
    pairs = []
    for item in items:
        pair = _pair(item)
        if pair is not None:
            pairs.append(pair)
    return tuple(dict.fromkeys(pairs))


def _pair(item: Any) -> tuple[str, str] | None:
    if not isinstance(item, dict):
        return None
    system, value = item.get("system"), item.get("value")
    if isinstance(system, str) and isinstance(value, str) and system.strip() and value.strip():
        return system.strip(), value.strip()
    return None


def _token(identifier: Identifier) -> tuple[str, str]:
    return identifier.system, identifier.value


def _national(system: str) -> str:
    try:
        return canonical_system(system)
    except InvalidIdentifier as error:
        raise InvalidInput(f"national identifier system: {error}") from None


def _redacted(error: Exception) -> str:
    """The error without the identifier value in it (messages may reach logs)."""
    return _LONG_NUMBER.sub("<value>", str(error))


def _shown(value: object) -> str:
    text = (
        json.dumps(value)
        if isinstance(value, str | int | float | bool) or value is None
        else (type(value).__name__)
    )
    return text if len(text) <= 40 else text[:37] + "..."


def _sniff_type(path: Path) -> str:
    if not path.is_file():  # a FIFO would block; _load refuses it with a reason
        return ""
    try:
        with path.open("rb") as handle:
            head = handle.read(_SNIFF_BYTES).decode("utf-8", "replace")
    except OSError:
        return ""
    match = _SNIFF_TYPE.search(head.split('"entry"', 1)[0])
    return match.group(1) if match else ""


async def _write(store: NodeStore, draft: BundleDraft, started: float) -> IngestReport:
    written = await store.write_bundle(draft)
    report = IngestReport(
        file=draft.file,
        patients=written.patients,
        new_patients=written.new_patients,
        patient_keys=written.patient_keys,
        unindexed_keys=written.unindexed_keys,
        kept_identifiers=written.kept_identifiers,
        resources=written.resources,
        documents=written.documents,
        published=written.published,
        unpublished=written.unpublished,
        skipped=written.skipped,
        seconds=time.perf_counter() - started,
    )
    log.debug("ingested %s", report.summary())
    return report
