"""``transmural``: the clinician's thin client.

  transmural search IDENTIFIER            find a patient across the network
  transmural fetch IDENTIFIER --facility NODE --document ID [-o FILE]

IDENTIFIER is a FHIR token ``system|value`` or a bare national identifier
(the node's configured system, e.g. a BSN). Your node's gateway address,
your clinician token and the network CA come from --node/--token/--ca, from
TRANSMURAL_NODE / TRANSMURAL_TOKEN / TRANSMURAL_CA, or from a client file
(--config, TRANSMURAL_CONFIG, ~/.config/transmural/client.json).

Exit codes: 0 the search ran (each facility's status is shown, refusals
included) or the document was written; 1 no facility knows the patient, or
the network said no to a fetch (not found, refused, a facility or the
registry unreachable, checksum mismatch); 2 bad input; 3 your node is not
reachable; 4 your token is not accepted (unknown or expired).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import TextIO

from tools.client_settings import Overrides, node_access
from tools.gateway_client import ClientError, FacilityResult, GatewayClient, Holders
from tools.render import documents_table, facility_line, holders_line, search_json
from transmural.process import OneLineParser

#: Longest per-facility deadline a node accepts (node.const.MAX_PEER_DEADLINE_S).
MAX_DEADLINE_MS = 30_000


async def search(
    client: GatewayClient,
    identifier: str,
    purpose: str,
    as_json: bool,
    out: TextIO,
    deadline_ms: int = 0,
    table_limit: int | None = None,
    reason: str = "",
) -> list[FacilityResult]:
    """Run one search, printing facilities as they answer; returns results."""
    holders: Holders | None = None
    results: list[FacilityResult] = []
    async for event in client.search(identifier, purpose, deadline_ms, reason):
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


def _common_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """Options every command takes, before or after the command name.

    The copies on the commands default to SUPPRESS, so a value given before
    the command is not overwritten by the command's own default.
    """

    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument(
        "--config",
        type=Path,
        default=default(None),
        metavar="FILE",
        help="client file with node, node_id, ca_certificate and token "
        "(default: $TRANSMURAL_CONFIG or ~/.config/transmural/client.json)",
    )
    parser.add_argument(
        "--node",
        default=default(None),
        metavar="HOST:PORT",
        help="your node's gateway (default: $TRANSMURAL_NODE or the client file)",
    )
    parser.add_argument(
        "--token",
        default=default(None),
        help="your clinician token (default: $TRANSMURAL_TOKEN or the client file)",
    )
    parser.add_argument(
        "--ca",
        dest="ca_certificate",
        default=default(None),
        metavar="FILE",
        help="the network CA certificate (default: $TRANSMURAL_CA or the client file)",
    )
    parser.add_argument(
        "--node-id",
        default=default(None),
        help="your node's id, checked against its certificate (default: $TRANSMURAL_NODE_ID)",
    )
    parser.add_argument(
        "--insecure-dev",
        action="store_true",
        default=default(False),
        help="talk plain gRPC to a node run with --insecure-dev (development only)",
    )
    parser.add_argument(
        "--purpose",
        default=default("treatment"),
        choices=["treatment", "emergency"],
        help="purpose of use (default: treatment); emergency is break-the-glass",
    )
    parser.add_argument(
        "--reason", default=default(""),
        help="why: required with --purpose emergency, recorded in every facility's audit log",
    )  # fmt: skip


def _deadline_ms(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value <= MAX_DEADLINE_MS:
        raise argparse.ArgumentTypeError(f"must be 0 to {MAX_DEADLINE_MS} ms")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="transmural", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _common_options(parser, defaults=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("search", help="find a patient's documents across the network")
    _common_options(s, defaults=False)
    s.add_argument("identifier", help="system|value, or a bare national identifier (e.g. a BSN)")
    s.add_argument(
        "--json", action="store_true", help="machine-readable output (schema in the README)"
    )
    s.add_argument(
        "--deadline-ms",
        type=_deadline_ms,
        default=0,
        metavar="MS",
        help="how long to wait for each facility, in ms (default 0: the node's own, 3000)",
    )
    f = sub.add_parser("fetch", help="fetch one document from a facility")
    _common_options(f, defaults=False)
    f.add_argument("identifier", help="the patient, as for search")
    f.add_argument("--facility", required=True, help="node id of the facility holding it")
    f.add_argument("--document", required=True, help="document id (from search)")
    f.add_argument("-o", "--output", type=Path, help="file to write; '-' or none: standard output")
    f.add_argument("--json", action="store_true", help="with -o: print the metadata as JSON")
    return parser


async def _run(args: argparse.Namespace) -> int:
    access = node_access(
        Overrides(
            config=args.config, node=args.node, token=args.token,
            ca_certificate=args.ca_certificate, node_id=args.node_id,
            insecure_dev=args.insecure_dev,
        )
    )  # fmt: skip
    client = GatewayClient(access)
    try:
        if args.command == "search":
            results = await search(
                client, args.identifier, args.purpose, args.json, sys.stdout, args.deadline_ms,
                reason=args.reason,
            )  # fmt: skip
            return 0 if results else 1
        return await _fetch(client, args)
    finally:
        await client.close()


async def _fetch(client: GatewayClient, args: argparse.Namespace) -> int:
    """Fetch into ``-o FILE`` (via FILE.part, renamed once verified) or stdout."""
    if args.output is None or str(args.output) == "-":
        if args.json:
            raise ClientError("--json prints the metadata of a file written with -o FILE", 2)
        await client.fetch(
            args.identifier, args.facility, args.document, sys.stdout.buffer, args.purpose,
            args.reason,
        )  # fmt: skip
        sys.stdout.flush()
        return 0
    target: Path = args.output
    partial = target.with_name(target.name + ".part")
    try:
        # Patient data: owner-only from the first byte.
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            meta = await client.fetch(
                args.identifier, args.facility, args.document, handle, args.purpose, args.reason
            )
        partial.replace(target)
    except OSError as error:
        raise ClientError(f"cannot write to {target}: {error.strerror or error}", 2) from None
    finally:
        partial.unlink(missing_ok=True)
    if args.json:
        summary = {
            "file": str(target),
            "size": meta.size,
            "sha256": meta.sha256,
            "title": meta.title,
            "content_type": meta.content_type,
        }
        print(json.dumps(summary))
    else:
        print(
            f"wrote {meta.size} bytes to {target} ({meta.content_type}), SHA-256 verified",
            file=sys.stderr,
        )
    return 0


def _check_output(target: Path | None) -> None:
    """Refuse an unusable -o before asking the network for anything."""
    if target is None or str(target) == "-":
        return
    if target.is_dir():
        raise ClientError(f"cannot write to {target}: it is a folder", 2)
    if not target.parent.is_dir():
        raise ClientError(f"cannot write to {target}: folder {target.parent} does not exist", 2)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "fetch":
            _check_output(args.output)
        return asyncio.run(_run(args))
    except ClientError as error:
        print(f"transmural: {error}", file=sys.stderr)
        return error.exit_code
    except BrokenPipeError:
        # The reader (e.g. head) left; say nothing more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as error:
        print(f"transmural: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
