"""``transmural``: the clinician's thin client.

  transmural login --node HOST:PORT --node-id ID --ca FILE --token TOKEN
                                          save (and check) your node and token
  transmural search IDENTIFIER [--type TEXT] [--since DATE] [--until DATE]
                                          find a patient's documents across the network
  transmural report IDENTIFIER [--json | --fhir] [--all]
                                          one merged live report from every facility
  transmural fetch IDENTIFIER --facility NODE --document ID [-o FILE]

IDENTIFIER is a FHIR token ``system|value`` or a bare national identifier
(the node's configured system, e.g. a BSN). Your node's gateway address,
your clinician token and the network CA come from --node/--token/--ca, from
TRANSMURAL_NODE / TRANSMURAL_TOKEN / TRANSMURAL_CA, or from a client file
(--config, TRANSMURAL_CONFIG, ~/.config/transmural/client.json) that
`transmural login` writes.

Exit codes:
  0  the search or report ran (each facility's status is shown, refusals
     included), the document was written, or the login was saved
  1  no facility knows the patient, or the network said no to a fetch (not
     found, consent refused, checksum mismatch)
  2  bad input (e.g. a BSN failing the 11-check; no node, token or CA given;
     a node address that is not HOST:PORT; --since after --until)
  3  your node is not reachable: not running, not answering in time, or not
     your node (its certificate is not from your CA or names another node);
     or it is busy (too many requests at once, or you already have 16
     running there)
  4  your token is not accepted (unknown or expired)
  5  the network could not answer: the registry (or, for fetch, the facility)
     was unreachable or did not answer in time; nothing is known about the
     patient's records
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from datetime import date
from pathlib import Path
from typing import BinaryIO, NoReturn, TextIO, TypeVar

from tools import report_view
from tools.client_settings import Overrides, add_connection_options, login, node_access
from tools.gateway_client import (
    ClientError,
    Document,
    FacilityItems,
    FacilityResult,
    GatewayClient,
    Holders,
    split_token,
)
from tools.render import (
    DocumentFilter,
    FetchProgress,
    LiveStatus,
    documents_table,
    printable,
    search_json,
)
from tools.report_merge import RECENT_ROWS, merge
from transmural.process import OneLineParser

Answer = TypeVar("Answer", FacilityResult, FacilityItems)

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
    only: DocumentFilter | None = None,
) -> list[FacilityResult]:
    """Run one search, showing facilities as they answer; returns the (unfiltered) results."""
    events = client.search(identifier, purpose, deadline_ms, reason)
    holders, results = await _collect(events, _status_stream(out, as_json))
    shown = only.apply(results) if only and only.active else results
    if as_json:
        json.dump(search_json(identifier, holders, shown), out, indent=2)
        print(file=out)
        return results
    table = documents_table(shown, table_limit)
    if only and only.active:
        total, kept = (sum(len(r.documents) for r in rs) for rs in (results, shown))
        print(f"\n{kept} of {total} documents match ({only.describe()})", file=out)
    if table:
        print(file=out)
        print("\n".join(table), file=out)
    return results


async def report(
    client: GatewayClient,
    identifier: str,
    out: TextIO,
    output: str = "tables",
    purpose: str = "treatment",
    reason: str = "",
    deadline_ms: int = 0,
    every_row: bool = False,
) -> list[FacilityItems]:
    """The live report: statuses as facilities answer, then the merged report.

    ``output`` is ``tables``, ``json`` or ``fhir``; tables show the newest
    ``RECENT_ROWS`` encounters and procedures unless ``every_row``.
    """
    events = client.report(identifier, purpose, deadline_ms, reason)
    holders, results = await _collect(events, _status_stream(out, output != "tables"))
    limit = RECENT_ROWS if output == "tables" and not every_row else None
    merged = merge(
        results, recent_limit=limit, patient=identifier,
        correlation_id=holders.correlation_id if holders else "",
        incomplete=holders.incomplete if holders else "",
    )  # fmt: skip
    if merged.incomplete and output != "tables":
        # The JSON and FHIR outputs carry it, but their reader may not look: say it here too.
        say(f"warning: {merged.incomplete}")
    if output == "tables":
        print(file=out)
        if purpose == "emergency":
            print(
                f"EMERGENCY ACCESS (break-the-glass): every facility recorded it with your "
                f"reason, {reason!r}; where consent refused you, it was overridden.",
                file=out,
            )
        report_view.print_tables(merged, out)
    else:
        shape = report_view.report_json if output == "json" else report_view.report_fhir
        json.dump(shape(merged), out, indent=2, ensure_ascii=False)
        print(file=out)
    return results


def say(message: str) -> None:
    """One line to the clinician on stderr, control characters escaped: it may
    quote what they typed (a node id, a path) or what the network sent."""
    print(printable(f"transmural: {message}"), file=sys.stderr)


async def _collect(
    events: AsyncIterator[Holders | Answer], status_out: TextIO | None
) -> tuple[Holders | None, list[Answer]]:
    """Every facility's answer, each shown as it comes (``LiveStatus``)."""
    holders: Holders | None = None
    answers: list[Answer] = []
    with LiveStatus(status_out) as status:
        async for event in events:
            if isinstance(event, Holders):
                holders = event
                status.located(event)
            else:
                answers.append(event)
                status.answered(event)
    return holders, answers


def _status_stream(out: TextIO, machine_output: bool) -> TextIO | None:
    """Statuses go with human output; beside JSON only to a terminal's stderr."""
    if not machine_output:
        return out
    return sys.stderr if sys.stderr.isatty() else None


def _common_options(parser: argparse.ArgumentParser, defaults: bool, purpose: bool = True) -> None:
    """Options every command takes, before or after the command name.

    The copies on the commands default to SUPPRESS, so a value given before
    the command is not overwritten by the command's own default.
    """
    add_connection_options(parser, defaults)
    if not purpose:
        return
    parser.add_argument(
        "--purpose",
        default="treatment" if defaults else argparse.SUPPRESS,
        choices=["treatment", "emergency"],
        help="purpose of use (default: treatment); emergency is break-the-glass",
    )
    parser.add_argument(
        "--reason", default="" if defaults else argparse.SUPPRESS,
        help="why: required with --purpose emergency, recorded in every facility's audit log",
    )  # fmt: skip
    _deadline_option(parser, defaults)


def _deadline_ms(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value <= MAX_DEADLINE_MS:
        raise argparse.ArgumentTypeError(f"must be 0 to {MAX_DEADLINE_MS} ms")
    return value


def _type_text(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty: give the TEXT to look for, or leave it out")
    return text


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date: write YYYY-MM-DD") from None


class _Parser(OneLineParser):
    """A usage error quotes the argument given: escaped, as every error line is.
    (Subcommand parsers are of this class too: argparse makes them so.)"""

    def error(self, message: str) -> NoReturn:
        super().error(printable(message))


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="transmural", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _common_options(parser, defaults=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    login = sub.add_parser(
        "login",
        help="save your node, its CA and your token in the client file (mode 0600)",
        description="Write the client file (--config, $TRANSMURAL_CONFIG or "
        "~/.config/transmural/client.json, mode 0600) from --node, --node-id, --ca and "
        "--token (or TRANSMURAL_*). Before writing, a standard gRPC health check proves "
        "the node answers, its TLS certificate is from that CA and names that node id, "
        "and it serves the Gateway; it cannot check the token without an audited call: "
        "your first search or report does (exit 4 if refused).",
    )
    _common_options(login, defaults=False, purpose=False)
    login.add_argument(
        "--no-check", action="store_true", help="write the file without asking the node"
    )
    s = sub.add_parser("search", help="find a patient's documents across the network")
    _common_options(s, defaults=False)
    s.add_argument("identifier", help="system|value, or a bare national identifier (e.g. a BSN)")
    s.add_argument(
        "--json", action="store_true", help="machine-readable output (schema in the README)"
    )
    s.add_argument(
        "--type", type=_type_text, metavar="TEXT",  # no default: argparse would check ""
        help="only documents whose type (display or code) or title contains TEXT",
    )  # fmt: skip
    s.add_argument("--since", type=_day, metavar="DATE", help="only documents from DATE on")
    s.add_argument("--until", type=_day, metavar="DATE", help="only documents up to DATE")
    r = sub.add_parser(
        "report",
        help="one merged report of a patient from every facility",
        description="Ask every facility that knows the patient for its structured data and "
        "merge it: problems, medication, allergies, latest results, recent encounters and "
        "procedures, immunisations; each row names its source facilities and dates.",
    )
    _common_options(r, defaults=False)
    r.add_argument("identifier", help="the patient, as for search")
    formats = r.add_mutually_exclusive_group()
    formats.add_argument("--json", action="store_true", help="JSON (schema in the README)")
    formats.add_argument(
        "--fhir", action="store_true", help="a FHIR R4 Bundle (collection) of the resources"
    )
    r.add_argument(
        "--all", action="store_true",
        help=f"every encounter and procedure (tables show the newest {RECENT_ROWS})",
    )  # fmt: skip
    f = sub.add_parser("fetch", help="fetch one document from a facility")
    _common_options(f, defaults=False)
    f.add_argument("identifier", help="the patient, as for search")
    f.add_argument("--facility", required=True, help="node id of the facility holding it")
    f.add_argument("--document", required=True, help="document id (from search)")
    f.add_argument("-o", "--output", type=Path, help="file to write; '-' or none: standard output")
    f.add_argument("--json", action="store_true", help="with -o: print the metadata as JSON")
    return parser


def _deadline_option(parser: argparse.ArgumentParser, defaults: bool = True) -> None:
    parser.add_argument(
        "--deadline-ms",
        type=_deadline_ms,
        default=0 if defaults else argparse.SUPPRESS,
        metavar="MS",
        help="how long to wait for each facility, in ms (default 0: the node's own, 3000)",
    )


def _overrides(args: argparse.Namespace) -> Overrides:
    return Overrides(
        config=args.config, node=args.node, token=args.token,
        ca_certificate=args.ca_certificate, node_id=args.node_id,
        insecure_dev=args.insecure_dev,
    )  # fmt: skip


async def _run(args: argparse.Namespace) -> int:
    if args.command == "login":
        return await _login(args)
    if args.command in ("search", "report"):
        split_token(args.identifier)  # a malformed identifier is bad input, whatever the settings
    client = GatewayClient(node_access(_overrides(args)))
    try:
        if args.command == "search":
            only = DocumentFilter(args.type or "", args.since, args.until)
            results = await search(
                client, args.identifier, args.purpose, args.json, sys.stdout, args.deadline_ms,
                reason=args.reason, only=only,
            )  # fmt: skip
            return 0 if results else 1
        if args.command == "report":
            output = "json" if args.json else "fhir" if args.fhir else "tables"
            answers = await report(
                client, args.identifier, sys.stdout, output, args.purpose, args.reason,
                args.deadline_ms, args.all,
            )  # fmt: skip
            return 0 if answers else 1
        return await _fetch(client, args)
    finally:
        await client.close()


async def _login(args: argparse.Namespace) -> int:
    print(printable(await login(_overrides(args), check=not args.no_check)), file=sys.stderr)
    return 0


async def _fetch(client: GatewayClient, args: argparse.Namespace) -> int:
    """Fetch into ``-o FILE`` (via FILE.part, renamed once verified) or stdout."""
    if args.output is None or str(args.output) == "-":
        if args.json:
            raise ClientError("--json prints the metadata of a file written with -o FILE", 2)
        await _fetch_into(client, args, sys.stdout.buffer)
        sys.stdout.flush()
        return 0
    target: Path = args.output
    partial = target.with_name(target.name + ".part")
    try:
        # Patient data: owner-only from the first byte.
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            meta = await _fetch_into(client, args, handle)
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
            printable(
                f"wrote {meta.size} bytes to {target} ({meta.content_type}), SHA-256 verified"
            ),
            file=sys.stderr,
        )
    return 0


async def _fetch_into(client: GatewayClient, args: argparse.Namespace, out: BinaryIO) -> Document:
    """The fetch, with a progress bar on a terminal's stderr for a large document."""
    progress = FetchProgress(f"document {args.document}", sys.stderr)
    try:
        return await client.fetch(
            args.identifier, args.facility, args.document, out, args.purpose, args.reason,
            progress,
        )  # fmt: skip
    finally:
        progress.close()


def _check_dates(since: date | None, until: date | None) -> None:
    """A reversed range matches nothing: bad input, not "0 documents match"."""
    if since is not None and until is not None and since > until:
        raise ClientError(
            f"--since {since} is after --until {until}: no document could match "
            "(both dates are inclusive; swap them?)", 2,
        )  # fmt: skip


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
        if args.command == "search":
            _check_dates(args.since, args.until)
        return asyncio.run(_run(args))
    except ClientError as error:
        say(str(error))
        return error.exit_code
    except BrokenPipeError:
        # The reader (e.g. head) left; say nothing more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as error:
        say(str(error))
        return 1


if __name__ == "__main__":
    sys.exit(main())
