"""``transmural-admin consent``: a patient's consent at one node, by identifier.

  consent add --config NODE.toml IDENTIFIER --permit|--deny [--organisation ID | --category CAT]
              [--data CAT ...] [--from DATE] [--until DATE] --recorded-by NAME [--via desk|portal]
  consent list --config NODE.toml IDENTIFIER [--json]
  consent withdraw --config NODE.toml CONSENT_ID
  consent import --config NODE.toml IDENTIFIER FILE.json   a FHIR Consent or Bundle; all or none
  consent export --config NODE.toml IDENTIFIER              a FHIR Bundle of Consents on stdout

An ``--organisation`` is checked against the network's members (the
registry's directory) first: a mistyped URA would make a deny match no
one while a broader permit lets the data flow. An id no member has is
refused unless ``--not-yet-joined``; when the registry cannot be asked the
consent is recorded with a warning saying it was not checked.

Every change goes through ``node.consent_desk.ConsentDesk``: stored, written
to the audit log, and the patient's registry listing queued for the
running node to re-evaluate (the index follows consent). Exit 1 when the
patient or consent is not at this node; bad input raises a TransmuralError
that ``transmural-admin`` turns into 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from node.config import NodeConfig
from node.consent import (
    DATA_CATEGORIES,
    ORGANISATION_CATEGORIES,
    RECORDED_VIA,
    ActorKind,
    ConsentRecord,
    as_utc,
    covering,
    describe,
    is_fhir_datetime,
    new_consent_id,
    span,
)
from node.consent_desk import ConsentDesk
from node.consent_fhir import (
    IMPORTED_BY,
    consents_from_json,
    organisation_id_of,
    organisation_references,
    to_bundle,
)
from node.records import PatientRecord
from node.registry_link import RegistryLink
from node.store import NodeStore
from tools.admin_audit import os_user, record_local
from tools.render import counted
from transmural import transport
from transmural.clock import SystemClock, utc_iso
from transmural.errors import InvalidInput, NotFound, TransmuralError
from transmural.identifiers import canonical, parse_token
from transmural.process import given_path

#: A consent file larger than this is refused unread (a patient has a handful).
MAX_IMPORT_BYTES = 10 * 1024 * 1024
#: Members named when an --organisation is refused (a national network has thousands).
MEMBERS_SHOWN = 10


def add_consent_commands(sub: argparse._SubParsersAction) -> None:
    """``consent add|list|withdraw|import|export`` under ``transmural-admin``."""
    consent = sub.add_parser("consent", help="a patient's consent at this node (FHIR Consent)")
    actions = consent.add_subparsers(
        dest="consent_command", required=True, metavar="ACTION",
        help="add, list, withdraw, import, export",
    )  # fmt: skip
    add = actions.add_parser(
        "add",
        help="record a permit or deny",
        description="Record one consent: a permit or deny, for every organisation or one "
        "organisation or one kind, of all data or some categories, for a period. A more "
        "specific consent beats a broader one; at the same level a deny beats a permit.",
    )
    _config_and_patient(add)
    decision = add.add_mutually_exclusive_group(required=True)
    decision.add_argument("--permit", action="store_true", help="the patient allows sharing")
    decision.add_argument("--deny", action="store_true", help="the patient refuses sharing")
    whom = add.add_mutually_exclusive_group()
    whom.add_argument(
        "--organisation", metavar="ID",
        help="only this organisation id (URA); checked against the network's members",
    )  # fmt: skip
    whom.add_argument(
        "--category", choices=ORGANISATION_CATEGORIES, help="only this kind of organisation"
    )
    add.add_argument(
        "--data", nargs="+", choices=DATA_CATEGORIES, default=[], metavar="CAT",
        help=f"only these data categories ({', '.join(DATA_CATEGORIES)}); default all data",
    )  # fmt: skip
    add.add_argument(
        "--from", dest="start", type=_datetime, metavar="DATE",
        help="first day (YYYY-MM-DD) or moment (with zone) it applies; default now",
    )  # fmt: skip
    add.add_argument(
        "--until", dest="end", type=_datetime, metavar="DATE",
        help="last day (inclusive) or moment it applies; default open-ended",
    )  # fmt: skip
    add.add_argument(
        "--not-yet-joined", action="store_true",
        help="record an --organisation that no member of the network has (yet)",
    )  # fmt: skip
    add.add_argument("--recorded-by", required=True, metavar="NAME", help="who records it")
    add.add_argument(
        "--via", choices=RECORDED_VIA, default="desk", help="how it was given (default desk)"
    )
    listing = actions.add_parser("list", help="the patient's consents, withdrawn ones too")
    _config_and_patient(listing)
    listing.add_argument("--json", action="store_true", help="JSON instead of a table")
    withdraw = actions.add_parser(
        "withdraw", help="withdraw a consent (it stays listed, marked withdrawn)"
    )
    withdraw.add_argument("--config", type=given_path, required=True, help="the node's TOML config")
    withdraw.add_argument("consent_id", metavar="CONSENT_ID", help="c-... as `list` shows it")
    withdraw.add_argument(
        "--recorded-by", default=os_user(),
        help="who withdraws it, for the audit log (default: your user name)",
    )  # fmt: skip
    imports = actions.add_parser(
        "import",
        help="record the consents of a FHIR Consent or Bundle file (all or none)",
        description="Record every Consent in FILE (a Consent, or a Bundle of them) for the "
        "patient. Nothing is recorded unless every one maps onto a consent record here; "
        "each element that does not is named.",
    )
    _config_and_patient(imports)
    imports.add_argument(
        "--not-yet-joined", action="store_true",
        help="accept organisations that no member of the network has (yet)",
    )  # fmt: skip
    imports.add_argument("file", type=given_path, metavar="FILE.json", help="the FHIR JSON file")
    imports.add_argument(
        "--recorded-by", default=IMPORTED_BY, metavar="NAME",
        help=f"recorded by, for Consents naming no performer (default {IMPORTED_BY!r})",
    )  # fmt: skip
    export = actions.add_parser("export", help="the patient's consents as a FHIR Bundle")
    _config_and_patient(export)


def _config_and_patient(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=given_path, required=True, help="the node's TOML config")
    parser.add_argument("identifier", help="system|value or a bare national identifier")


def _datetime(text: str) -> str:
    """argparse type for --from/--until: a FHIR date or a date-time with a zone."""
    if not is_fhir_datetime(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a date (YYYY-MM-DD) or a date-time with zone "
            "(YYYY-MM-DDThh:mm:ss+01:00)"
        )
    return text


async def run(args: argparse.Namespace) -> int:
    """Run one consent action; 1 when the patient or consent is not at this node."""
    config = NodeConfig.load(args.config)
    store = await NodeStore.open(config.database, existing=True, node=config.identity)
    try:
        if args.consent_command == "withdraw":
            return await _withdraw(store, args.consent_id, args.recorded_by)
        patient = await store.patient_by_identifier(
            parse_token(args.identifier, config.national_system)
        )
        if patient is None:
            raise NotFound("no patient with that identifier at this node")
        if args.consent_command == "add":
            return await _add(store, patient, args, config)
        if args.consent_command == "list":
            await _audit_read(store, patient, config, "listed")
            return await _list(store, patient, args.json)
        if args.consent_command == "import":
            return await _import(store, patient, args, config)
        await _audit_read(store, patient, config, "exported as FHIR")
        return await _export(store, patient, config.organisation_id)
    except NotFound as error:
        print(f"transmural-admin: {error}", file=sys.stderr)
        return 1
    finally:
        await store.close()


async def _audit_read(
    store: NodeStore, patient: PatientRecord, config: NodeConfig, how: str
) -> None:
    """A patient's consents are their data too: who read them is in their access history."""
    await record_local(
        store, "consent-read", f"consents {how} with transmural-admin",
        patient_key=patient.patient_key, organisation_id=config.organisation_id,
    )  # fmt: skip


async def _add(
    store: NodeStore, patient: PatientRecord, args: argparse.Namespace, config: NodeConfig
) -> int:
    now = utc_iso(SystemClock().now())
    kind: ActorKind = "all"
    actor = ""
    if args.organisation is not None:
        kind, actor = "organisation", args.organisation
    elif args.category is not None:
        kind, actor = "category", args.category
    if args.not_yet_joined and kind != "organisation":
        raise InvalidInput("--not-yet-joined goes with --organisation")
    _check_period(args.start or now, args.end)
    record = ConsentRecord(
        consent_id=new_consent_id(), patient_key=patient.patient_key,
        decision="permit" if args.permit else "deny", actor_kind=kind, actor=actor,
        data=frozenset(args.data), period_start=args.start or now, period_end=args.end,
        recorded_by=args.recorded_by, recorded_via=args.via, recorded_at=now,
    )  # fmt: skip
    same = covering(record, await store.consents_of(patient.patient_key))
    if same is not None:
        raise InvalidInput(
            f"{describe(same)}, {_period(same)} is recorded already: nothing was added"
        )
    if kind == "organisation" and not args.not_yet_joined:  # once its spelling is checked
        await _check_members(config, {actor})
    await ConsentDesk(store).record([record], by=os_user())
    print(f"recorded {describe(record)}, {_period(record)}")
    return 0


def _check_period(start: str, end: str | None) -> None:
    """Said in the options' words, before a consent (and its id) is made."""
    if end is None:
        return
    if span(end)[1] < as_utc(SystemClock().now()):
        raise InvalidInput(f"--until {end} is over: a consent that ended would never apply")
    if span(end)[1] < span(start)[0]:
        raise InvalidInput(f"--until {end} is before the consent starts ({start})")


async def _check_members(config: NodeConfig, organisation_ids: set[str]) -> None:
    """InvalidInput for an organisation id no member has; a warning when none could be asked."""
    link = RegistryLink(config.registry, _tls(config))
    try:
        members = {f.organisation_id for f in await link.list_nodes()}
    except TransmuralError as error:
        print(
            f"transmural-admin: warning: {', '.join(map(repr, sorted(organisation_ids)))} not "
            f"checked against the network's members ({error}); recording as given",
            file=sys.stderr,
        )
        return
    finally:
        await link.close()
    unknown = sorted(organisation_ids - members)
    if unknown:
        more = ", ..." if len(members) > MEMBERS_SHOWN else ""
        shown = ", ".join(sorted(members)[:MEMBERS_SHOWN]) + more
        raise InvalidInput(
            f"no member of the network has organisation id {', '.join(map(repr, unknown))} "
            f"(members: {shown or 'none'}); check it for a typo, or give --not-yet-joined "
            "to record it for an organisation that has not joined"
        )


def _tls(config: NodeConfig) -> transport.TlsFiles | None:
    if config.insecure_dev:
        return None
    assert config.ca_certificate and config.certificate and config.private_key
    return transport.TlsFiles.load(config.ca_certificate, config.certificate, config.private_key)


async def _list(store: NodeStore, patient: PatientRecord, as_json: bool) -> int:
    records = await store.consents_of(patient.patient_key)
    if as_json:
        print(json.dumps([_as_json(r) for r in records], indent=2))
        return 0
    if not records:
        print("no consent recorded for this patient here")
        return 0
    print(f"{'CONSENT':<14} {'STATUS':<9} {'DECISION':<8} {'WHOM':<26} {'DATA':<24} PERIOD")
    for r in records:
        whom = f"{r.actor_kind} {r.actor}".strip() if r.actor_kind != "all" else "all"
        data = " ".join(c for c in DATA_CATEGORIES if c in r.data) or "all"
        print(
            f"{r.consent_id:<14} {r.status:<9} {r.decision:<8} {whom:<26} {data:<24} "
            f"{_period(r)}; recorded {r.recorded_at} by {r.recorded_by} ({r.recorded_via})"
            + (f"; withdrawn {r.withdrawn_at}" if r.withdrawn_at else "")
        )
    return 0


def _period(record: ConsentRecord) -> str:
    return f"from {record.period_start}" + (
        f" until {record.period_end}" if record.period_end else ""
    )


def _as_json(record: ConsentRecord) -> dict[str, Any]:
    """A stable shape for scripts: the record's fields, data as an ordered list."""
    return {
        "consent_id": record.consent_id,
        "decision": record.decision,
        "actor_kind": record.actor_kind,
        "actor": record.actor,
        "data": [c for c in DATA_CATEGORIES if c in record.data],
        "period_start": record.period_start,
        "period_end": record.period_end,
        "recorded_by": record.recorded_by,
        "recorded_via": record.recorded_via,
        "recorded_at": record.recorded_at,
        "status": record.status,
        "withdrawn_at": record.withdrawn_at,
    }


async def _withdraw(store: NodeStore, consent_id: str, by: str) -> int:
    record = await ConsentDesk(store).withdraw(consent_id, by, operator=os_user())
    print(f"withdrew {describe(record)} at {record.withdrawn_at}")
    return 0


async def _import(
    store: NodeStore, patient: PatientRecord, args: argparse.Namespace, config: NodeConfig
) -> int:
    file, recorded_by = args.file, args.recorded_by
    document = await asyncio.to_thread(_read_json, file)
    _check_patient(document, patient, file)
    organisations: dict[str, str] = {}
    for reference in sorted(organisation_references(document)):
        organisation_id = organisation_id_of(await store.resolve(reference))
        if organisation_id:
            organisations[reference] = organisation_id
    records = consents_from_json(
        document, patient.patient_key, organisations=organisations, recorded_by=recorded_by,
        source=str(file),
    )  # fmt: skip
    named = {r.actor for r in records if r.actor_kind == "organisation"}
    if named and not args.not_yet_joined:
        await _check_members(config, named)
    await ConsentDesk(store).record(records, action="consent-import", by=os_user())
    print(f"imported {counted(len(records), 'consent')} from {file}:")
    for record in records:
        print(f"  {describe(record)}, {_period(record)}")
    return 0


def _check_patient(document: object, patient: PatientRecord, file: Path) -> None:
    """Refuse Consents that name another patient than the one given on the command line."""
    resources = [document]
    if isinstance(document, dict) and document.get("resourceType") == "Bundle":
        entries = document.get("entry")
        resources = [e.get("resource") for e in entries if isinstance(e, dict)] if isinstance(
            entries, list) else []  # fmt: skip
    ours = f"Patient/{patient.fhir_id}"
    identifier = patient.identifier
    for resource in resources:
        named = resource.get("patient") if isinstance(resource, dict) else None
        if not isinstance(named, dict):
            continue  # no patient named: it is recorded for the one given
        reference = named.get("reference")
        if isinstance(reference, str) and reference:
            if reference != ours:
                raise InvalidInput(f"{file}: a Consent names {reference}, not this patient")
            continue
        token = named.get("identifier")
        if isinstance(token, dict) and identifier is not None:
            try:
                same = canonical(str(token.get("system", "")), str(token.get("value", "")))
            except InvalidInput:
                same = None
            if same != identifier:
                raise InvalidInput(f"{file}: a Consent names another patient's identifier")


def _read_json(file: Path) -> object:
    try:
        with file.open("rb") as stream:
            raw = stream.read(MAX_IMPORT_BYTES + 1)
    except OSError as error:
        raise InvalidInput(f"cannot read {file}: {error.strerror or error}") from None
    if len(raw) > MAX_IMPORT_BYTES:
        raise InvalidInput(f"{file}: larger than {MAX_IMPORT_BYTES // (1024 * 1024)} MiB")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidInput(f"{file}: not JSON ({error})") from None
    except RecursionError:
        raise InvalidInput(f"{file}: JSON nested too deeply to be a Consent") from None


async def _export(store: NodeStore, patient: PatientRecord, custodian: str) -> int:
    records = await store.consents_of(patient.patient_key)
    bundle = to_bundle(records, f"Patient/{patient.fhir_id}", custodian)
    print(json.dumps(bundle, indent=2))
    return 0
