"""``transmural-admin``: run and load a network.

  transmural-admin ingest --config NODE.toml PATH...   load FHIR bundles into a node
  transmural-admin consent --config NODE.toml IDENTIFIER --allow|--deny
  transmural-admin devnet --nodes N [--data DIR] [--workdir DIR] [--demo]

Exit codes: 0 done; 1 some input was refused (each file is named); 2 bad
usage or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from node.config import NodeConfig
from node.ingest import ingest_file, ingest_folder
from node.records import IngestReport
from node.store import NodeStore
from tools import demo as demo_scenario
from tools import devnet
from tools.supervise import ProcessError
from transmural.errors import InvalidBundle, TransmuralError
from transmural.identifiers import parse_token
from transmural.pseudonym import Pseudonymiser, read_network_key


def say(message: str) -> None:
    print(message, flush=True)


async def ingest(config_path: Path, paths: list[Path]) -> int:
    """Load each file or folder; every refused bundle is named on stderr."""
    config = NodeConfig.load(config_path)
    pseudonymiser = Pseudonymiser(read_network_key(config.network_key_file))
    store = await NodeStore.open(config.database)
    failures = 0
    try:
        for path in paths:
            reports, refused = await _ingest_path(store, path, pseudonymiser, config)
            for problem in refused:
                print(f"refused: {problem}", file=sys.stderr)
            failures += len(refused)
            say(
                f"{len(reports)} bundles from {path}: {sum(r.patients for r in reports)} "
                f"patients, {sum(r.resources for r in reports)} resources, "
                f"{sum(r.documents for r in reports)} documents"
                + (f"; {len(refused)} refused" if refused else "")
            )
    finally:
        await store.close()
    return 1 if failures else 0


async def _ingest_path(
    store: NodeStore, path: Path, pseudonymiser: Pseudonymiser, config: NodeConfig
) -> tuple[list[IngestReport], list[InvalidBundle]]:
    if await asyncio.to_thread(path.is_dir):
        return await ingest_folder(store, path, pseudonymiser, config.national_system)
    try:
        return [await ingest_file(store, path, pseudonymiser, config.national_system)], []
    except InvalidBundle as problem:
        return [], [problem]


async def consent(config_path: Path, identifier: str, allow: bool) -> int:
    config = NodeConfig.load(config_path)
    store = await NodeStore.open(config.database)
    try:
        patient = await store.patient_by_identifier(parse_token(identifier, config.national_system))
        if patient is None:
            print("transmural-admin: no patient with that identifier at this node", file=sys.stderr)
            return 1
        await store.set_exchange_consent(patient.patient_key, allow)
    finally:
        await store.close()
    say(f"consent to exchange {'given' if allow else 'withdrawn'}")
    return 0


def run_devnet(args: argparse.Namespace) -> int:
    workdir = args.workdir or devnet.default_workdir()
    say(f"working folder: {workdir}")
    net = devnet.prepare(workdir, args.nodes, args.data, say)
    with devnet.running(net):
        devnet.start_registry(net)
        say(f"registry serving on {net.registry.address if net.registry else '?'}")
        devnet.write_configs(net)
        devnet.ingest_all(net, say)
        picks = demo_scenario.pick_patients(net.plan, net.national_system)
        keep = {p for p in (picks.shared, picks.single) if p}
        deny = {picks.denied} if picks.denied else set()
        asyncio.run(devnet.set_consent(net, keep, deny))
        devnet.start_nodes(net)
        asyncio.run(devnet.wait_published(net))
        network_json = devnet.write_network_json(net)
        for config, server in zip(net.configs, net.nodes, strict=True):
            say(f"{config.node_id} ({config.organisation_name}) serving on {server.address}")
        say(f"network description: {network_json}")
        if args.demo:
            ok = asyncio.run(demo_scenario.run(net, picks, sys.stdout))
            say(f"\nDatabases and logs stay in {workdir}")
            if not ok:
                print("demo: no search reached two facilities", file=sys.stderr)
            return 0 if ok else 1
        say(
            f"\nTry:  transmural --node {net.node_address(0)} search "
            f"'{net.national_system}|<identifier>'\nStop with Ctrl-C."
        )
        _wait_for_signal()
    return 0


def _wait_for_signal() -> None:
    received: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, _f: received.append(s))
    while not received:
        signal.pause()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="transmural-admin",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    i = sub.add_parser("ingest", help="load FHIR R4 bundles (files or folders) into a node")
    i.add_argument("--config", type=Path, required=True, help="the node's TOML config")
    i.add_argument("paths", type=Path, nargs="+")
    c = sub.add_parser("consent", help="record a patient's consent to exchange (yes/no)")
    c.add_argument("--config", type=Path, required=True, help="the node's TOML config")
    c.add_argument("identifier", help="system|value or a bare national identifier")
    choice = c.add_mutually_exclusive_group(required=True)
    choice.add_argument("--allow", action="store_true")
    choice.add_argument("--deny", action="store_true")
    d = sub.add_parser("devnet", help="run a registry and N nodes on loopback")
    d.add_argument("--nodes", type=int, default=3)
    d.add_argument("--data", type=Path, help="folder of FHIR bundles (default: synthetic)")
    d.add_argument("--workdir", type=Path, help="working folder (default: a new temp folder)")
    d.add_argument("--demo", action="store_true", help="run the scripted scenario and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "ingest":
            return asyncio.run(ingest(args.config, args.paths))
        if args.command == "consent":
            return asyncio.run(consent(args.config, args.identifier, args.allow))
        if not 1 <= args.nodes <= 50:
            print("transmural-admin: --nodes must be 1 to 50", file=sys.stderr)
            return 2
        return run_devnet(args)
    except (TransmuralError, ProcessError) as error:
        print(f"transmural-admin: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
