"""``transmural``: the clinician's thin client.

  transmural search IDENTIFIER            find a patient across the network
  transmural fetch IDENTIFIER --facility NODE --document ID [-o FILE]

IDENTIFIER is a FHIR token ``system|value`` or a bare national identifier
(the node's configured system, e.g. a BSN). The node is taken from
--node or TRANSMURAL_NODE; the clinician from --clinician-id/--name/--role
or TRANSMURAL_CLINICIAN_ID / _NAME / _ROLE.

Exit codes: 0 done; 1 the network answered no (no facility, not found,
refused, checksum mismatch); 2 bad input; 3 your node is not reachable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import TextIO

from tools.gateway_client import ClientError, Clinician, FacilityResult, GatewayClient, Holders
from tools.render import documents_table, facility_line, holders_line, search_json


async def search(
    client: GatewayClient,
    identifier: str,
    purpose: str,
    as_json: bool,
    out: TextIO,
    deadline_ms: int = 0,
    table_limit: int | None = None,
) -> list[FacilityResult]:
    """Run one search, printing facilities as they answer; returns results."""
    holders: Holders | None = None
    results: list[FacilityResult] = []
    async for event in client.search(identifier, purpose, deadline_ms):
        if isinstance(event, Holders):
            holders = event
            if not as_json:
                print(holders_line(event), file=out, flush=True)
            continue
        results.append(event)
        if not as_json:
            print(facility_line(event), file=out, flush=True)
    if as_json:
        json.dump(search_json(identifier, holders, results), out, indent=2)
        print(file=out)
    else:
        table = documents_table(results, table_limit)
        if table:
            print(file=out)
            print("\n".join(table), file=out)
    return results


def _parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="transmural", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--node", default=env("TRANSMURAL_NODE"), help="your node's host:port")
    parser.add_argument("--clinician-id", default=env("TRANSMURAL_CLINICIAN_ID", "clinician"))
    parser.add_argument("--name", default=env("TRANSMURAL_CLINICIAN_NAME", "Clinician"))
    parser.add_argument("--role", default=env("TRANSMURAL_CLINICIAN_ROLE", "physician"))
    parser.add_argument(
        "--purpose",
        default="treatment",
        choices=["treatment", "emergency"],
        help="purpose of use (default: treatment)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("search", help="find a patient's documents across the network")
    s.add_argument("identifier")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--deadline-ms", type=int, default=0, help="per-facility deadline")
    f = sub.add_parser("fetch", help="fetch one document from a facility")
    f.add_argument("identifier")
    f.add_argument("--facility", required=True, help="node id of the facility holding it")
    f.add_argument("--document", required=True, help="document id (from search)")
    f.add_argument("-o", "--output", type=Path, help="file to write (default: stdout)")
    f.add_argument("--json", action="store_true", help="print the metadata as JSON")
    return parser


async def _run(args: argparse.Namespace) -> int:
    clinician = Clinician(args.clinician_id, args.name, args.role)
    client = GatewayClient(args.node, clinician)
    try:
        if args.command == "search":
            results = await search(
                client, args.identifier, args.purpose, args.json, sys.stdout, args.deadline_ms
            )
            return 0 if results else 1
        return await _fetch(client, args)
    finally:
        await client.close()


async def _fetch(client: GatewayClient, args: argparse.Namespace) -> int:
    if args.output is None:
        meta = await client.fetch(
            args.identifier, args.facility, args.document, sys.stdout.buffer, args.purpose
        )
        sys.stdout.flush()
    else:
        partial = args.output.with_name(args.output.name + ".part")
        try:
            with partial.open("wb") as handle:
                meta = await client.fetch(
                    args.identifier, args.facility, args.document, handle, args.purpose
                )
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        partial.replace(args.output)
        if args.json:
            summary = {
                "file": str(args.output),
                "size": meta.size,
                "sha256": meta.sha256,
                "title": meta.title,
                "content_type": meta.content_type,
            }
            print(json.dumps(summary))
        else:
            print(
                f"wrote {meta.size} bytes to {args.output} ({meta.content_type}), SHA-256 verified",
                file=sys.stderr,
            )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not args.node:
        print(
            "transmural: no node given: use --node HOST:PORT or set TRANSMURAL_NODE",
            file=sys.stderr,
        )
        return 2
    try:
        return asyncio.run(_run(args))
    except ClientError as error:
        print(f"transmural: {error}", file=sys.stderr)
        return error.exit_code
    except OSError as error:
        print(f"transmural: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
