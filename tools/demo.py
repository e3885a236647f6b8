"""The scripted demo: a clinician at facility 1 looks patients up.

It searches a patient whom several facilities treated (all consenting), a
patient who refused consent at one of them, a patient known at a single
facility, fetches one document from another facility, and shows that an
invalid identifier is refused with a reason. It fails (non-zero) if no
search got documents from at least two facilities, or, on a one-node
network where nothing can span facilities, if no search got documents.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from node.audit import AuditLog
from node.store import NodeStore
from tools.clinician import search
from tools.devnet import DevNet, _national_identifier
from tools.gateway_client import ClientError, FacilityItems, FacilityResult, GatewayClient
from tools.report_merge import merge
from tools.report_view import facilities_table_text
from tools.spread import SpreadPlan
from transmural.clock import SystemClock
from transmural.identifiers import BSN_SYSTEM, US_SSN_SYSTEM, canonical
from transmural.pseudonym import Pseudonymiser, read_network_key

#: Per national system, a value the node must refuse, and why it is wrong.
INVALID_IDENTIFIERS = {
    BSN_SYSTEM: ("123456789", "cannot be a BSN"),
    US_SSN_SYSTEM: ("999-12-345", "cannot be a US SSN: one digit short"),
}


@dataclass(frozen=True)
class DemoPicks:
    shared: str | None  # at 2+ facilities, consent everywhere
    denied: str | None  # at 2+ facilities, refuses at one
    single: str | None  # at one facility only


def pick_patients(plan: SpreadPlan, system: str) -> DemoPicks:
    """Patients that show each case, chosen the same way every run."""
    searchable = sorted(
        (
            fhir_id
            for fhir_id, p in plan.patients.items()
            if _national_identifier(p.identifiers, system) is not None
        ),
        key=lambda fhir_id: (-len(plan.patients[fhir_id].nodes), fhir_id),
    )
    multi = [f for f in searchable if len(plan.patients[f].nodes) >= 2]
    single = [f for f in searchable if len(plan.patients[f].nodes) == 1]
    return DemoPicks(
        shared=multi[0] if multi else None,
        denied=multi[1] if len(multi) > 1 else None,
        single=single[0] if single else None,
    )


async def run(net: DevNet, picks: DemoPicks, out: TextIO) -> str | None:
    """Run the scenario; None when it showed what it should, else what it missed."""
    home = net.configs[0]
    transport = "plain gRPC (--insecure-dev)" if net.insecure else "mutual TLS"
    print(
        f"\nA physician at {home.node_id} ({home.organisation_name}) signs in with the token "
        f"in {net.node_dir(0) / 'client.json'}; the nodes talk {transport}, each call "
        "carrying an assertion signed by the asking node.",
        file=out,
    )
    client = GatewayClient(net.access(0))
    # One node cannot show a search across facilities; documents are the goal then.
    needed = min(2, len(net.configs))
    reached = False
    fetched = False
    try:
        cases = [
            ("treated at several facilities, consent everywhere", picks.shared),
            ("treated at several facilities, refused consent at one", picks.denied),
            ("treated at one facility only", picks.single),
        ]
        for title, fhir_id in cases:
            if fhir_id is None:
                continue
            token = _token(net, fhir_id)
            print(f"\n== Search: a patient {title}\n$ transmural search '{token}'", file=out)
            results = await search(client, token, "treatment", False, out, table_limit=8)
            answered = [r for r in results if r.status == "ok" and r.documents]
            reached |= len(answered) >= needed
            if not fetched and answered:
                fetched = await _fetch_one(net, client, token, answered, out)
                await _live_report(client, token, out)
            if fhir_id == picks.denied and any(r.status == "consent-denied" for r in results):
                await _break_the_glass(net, client, token, results, out)
        await _invalid_identifier(client, net.national_system, out)
    finally:
        await client.close()
    _registry_summary(net, out)
    await _audit_summary(net, out)
    if reached:
        return None
    return "no search reached two facilities" if needed == 2 else "no search returned documents"


async def _live_report(client: GatewayClient, token: str, out: TextIO) -> None:
    """The merged picture of the same patient: one row per finding, every source named."""
    print(f"\n== The live report of the same patient\n$ transmural report '{token}'", file=out)
    answers = [e async for e in client.report(token) if isinstance(e, FacilityItems)]
    report = merge(answers, patient=token)
    print(facilities_table_text(report), file=out)
    for section in report.sections:
        merged = sum(1 for row in section.rows if len(row.sources) > 1)
        note = f", {merged} merged from several facilities" if merged else ""
        print(f"  {section.name:<14} {len(section.rows):>4} rows{note}", file=out)
    print("  (full tables: transmural report; --json; --fhir for a FHIR R4 Bundle)", file=out)


async def _break_the_glass(
    net: DevNet,
    client: GatewayClient,
    token: str,
    results: list[FacilityResult],
    out: TextIO,
) -> None:
    """The refusing facility answers an emergency with a reason, and flags it."""
    refusing = next(r for r in results if r.status == "consent-denied")
    reason = "unconscious in the emergency department"
    print(
        f"\n== Break-the-glass: the same patient, in an emergency (this network allows it)\n"
        f"$ transmural --purpose emergency --reason '{reason}' search '{token}'",
        file=out,
    )
    await search(client, token, "emergency", False, out, table_limit=3, reason=reason)
    index = next(i for i, c in enumerate(net.configs) if c.node_id == refusing.node_id)
    store = await NodeStore.open(net.configs[index].database)
    try:
        records = await AuditLog(store.database, SystemClock()).export(None, _pseudonym(net, token))
    finally:
        await store.close()
    for record in [r for r in records if r.break_the_glass][-1:]:
        print(
            f"{refusing.node_id}'s audit log: {record.time} {record.action} {record.outcome} "
            f"by {record.clinician_id} ({record.role}, {record.organisation_id}) "
            f'from {record.requesting_node}: "{record.break_the_glass_reason}"',
            file=out,
        )


def _pseudonym(net: DevNet, token: str) -> str:
    system, _, value = token.rpartition("|")
    key = read_network_key(net.configs[0].network_key_file)
    return Pseudonymiser(key).pseudonym(canonical(system, value)).hex()


async def _audit_summary(net: DevNet, out: TextIO) -> None:
    """Each node's audit chain, verified (transmural-admin audit verify)."""
    print("\n== Every access above is in each node's hash-chained audit log", file=out)
    for config in net.configs:
        store = await NodeStore.open(config.database)
        try:
            report = await AuditLog(store.database, SystemClock()).verify()
        finally:
            await store.close()
        state = "chain intact" if report.ok else f"BROKEN: {report.first_problem}"
        print(f"$ transmural-admin audit verify --db {config.database}\n"
              f"  {report.records} records, {state}", file=out)  # fmt: skip


async def _invalid_identifier(client: GatewayClient, system: str, out: TextIO) -> None:
    """Search a malformed identifier: the node refuses it and says why."""
    if system not in INVALID_IDENTIFIERS:
        return
    value, why = INVALID_IDENTIFIERS[system]
    print(f"\n== An identifier that {why}\n$ transmural search {value}", file=out)
    try:
        await search(client, value, "treatment", False, out)
    except ClientError as error:
        print(f"transmural: {error}", file=out)
    else:
        print("(the node did not refuse it)", file=out)


async def _fetch_one(
    net: DevNet, client: GatewayClient, token: str, answered: list[FacilityResult], out: TextIO
) -> bool:
    """Fetch the newest document, from another facility where possible."""
    remote = [r for r in answered if r.node_id != net.configs[0].node_id] or answered
    result = remote[0]
    document = max(result.documents, key=lambda d: d.created)
    target = net.workdir / "fetched" / _safe_name(document.document_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"\n== Fetch the newest document from {result.node_id}\n"
        f"$ transmural fetch '{token}' --facility {result.node_id} "
        f"--document {document.document_id} -o {target}",
        file=out,
    )
    with target.open("wb") as handle:
        meta = await client.fetch(token, result.node_id, document.document_id, handle)
    print(
        f"wrote {meta.size} bytes ({meta.content_type}), SHA-256 verified: {meta.title}", file=out
    )
    if meta.content_type.startswith("text/"):
        preview = target.read_text(errors="replace")[:300].strip()
        print("  | " + "\n  | ".join(preview.splitlines()), file=out)
    return True


def _token(net: DevNet, fhir_id: str) -> str:
    value = _national_identifier(net.plan.patients[fhir_id].identifiers, net.national_system)
    return f"{net.national_system}|{value}"


def _safe_name(document_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in document_id)[:120]


def _registry_summary(net: DevNet, out: TextIO) -> None:
    db = Path(net.workdir / "registry" / "registry.db")
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        entries = conn.execute("SELECT count(*) FROM index_entries").fetchone()[0]
        nodes = conn.execute("SELECT count(*) FROM nodes").fetchone()[0]
    print(
        f"\nThe registry knows {nodes} nodes and {entries} index entries: "
        f"pseudonyms only, no identifier, name or birth date.",
        file=out,
    )
