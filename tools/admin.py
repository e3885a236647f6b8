"""``transmural-admin``: create, grow, run and load a network.

  transmural-admin network init --dir DIR [--name NAME]  the operator's CA and keys
  transmural-admin invite --network-dir DIR --db REGISTRY_DB --org-id ID --org-name NAME
                          [--node-id ID] [--registry HOST:PORT] [--ttl-hours H]
  transmural-admin revoke --db REGISTRY_DB --org-id ID
  transmural-admin members --db REGISTRY_DB [--json]    nodes and invites, read-only
  transmural-admin join TOKEN --dir NODE_DIR              a facility joins
  transmural-admin rejoin TOKEN --config NODE.toml   a revoked node comes back, records kept
  transmural-admin bootstrap registry --data DIR --join-address HOST:PORT
                          [--invite NODE_ID:ORG_ID:ORG_NAME ...] [--invites-dir DIR]
  transmural-admin bootstrap node --data DIR [--token-file FILE] [--national-system URI]
                          [--listen HOST:PORT] [--gateway-listen HOST:PORT]
                          first start (init/invite, join), kept on a restart
  transmural-admin ingest --config NODE.toml PATH...   load FHIR bundles into a node
  transmural-admin consent add|list|withdraw|import|export --config NODE.toml ...
                          a patient's consent (FHIR Consent); see consent --help
  transmural-admin user add --config NODE.toml --id ID --name NAME --role ROLE
  transmural-admin user list|remove --config NODE.toml [--id ID]   who may search; revoke one
  transmural-admin audit verify --db NODE_DB            check the audit log's hash chain
  transmural-admin audit export --config NODE.toml --patient ID [--json]  access history
  transmural-admin devnet [--nodes N] [--data DIR] [--workdir DIR] [--demo]

Exit codes:
  0    done; devnet: stopped with Ctrl-C or SIGTERM, or the demo passed
  1    ingest: some file was refused (each is named); consent: no such
       patient (or consent) at this node; user remove: no such clinician;
       revoke: nothing left to revoke; audit verify:
       the chain is broken (the first problem is named); audit export: no
       such patient at this node; devnet: the registry exited while running,
       or the demo missed its goal
  2    bad usage, configuration or input; invite, join, rejoin, bootstrap: refused
       (the message says why); devnet: a server did not start
  130  interrupted (Ctrl-C) before devnet was up
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

from node.config import NodeConfig
from registry import const as registry_const
from registry import operator
from registry.network import init_network
from tools import admin_audit, admin_consent, admin_ingest, admin_members, bootstrap, devnet
from tools import demo as demo_scenario
from tools.admin_users import add_user_commands, run_user_command
from tools.rejoin import rejoin
from tools.render import counted
from tools.supervise import ProcessError, watch
from transmural import pki
from transmural.errors import ConfigError, TransmuralError
from transmural.identifiers import BSN_SYSTEM
from transmural.process import OneLineParser, given_path

MAX_NODES = 50


def say(message: str) -> None:
    print(message, flush=True)


def network_init(folder: Path, name: str) -> int:
    network = init_network(folder, name)
    say(f"network {network.name!r} created in {folder}")
    say(f"CA fingerprint (SHA-256): {network.ca_fingerprint}")
    say(
        "start the registry with: transmural-registry serve "
        f"--network-dir {folder} --db REGISTRY_DB"
    )
    return 0


async def invite(args: argparse.Namespace) -> int:
    """Print the token and nothing else, so a script can capture it."""
    token = await operator.invite(
        args.network_dir,
        args.db,
        args.org_id,
        args.org_name,
        node_id=args.node_id,
        join_address=args.registry,
        ttl_s=round(args.ttl_hours * 3600),
        organisation_category=args.category or "",
    )
    say(token)
    return 0


async def revoke(db: Path, organisation_id: str) -> int:
    serials, closed = await operator.revoke(db, organisation_id)
    if closed:
        say(f"closed {counted(closed, 'open invite')} of {organisation_id}: they no longer join")
    if serials:
        say(
            f"revoked {counted(len(serials), 'certificate')} of {organisation_id} "
            f"(serial {', '.join(serials)}); the registry refuses them within "
            f"{registry_const.REVOCATION_REFRESH_S:g} s"
        )
    elif not closed:
        print(
            f"transmural-admin: every certificate of {organisation_id} was already revoked",
            file=sys.stderr,
        )
        return 1
    return 0


async def join(args: argparse.Namespace) -> int:
    """Join and write node.toml: the same first-start path as devnet and compose."""
    folder: Path = args.dir
    if await asyncio.to_thread(bootstrap.is_joined, folder):
        raise ConfigError(f"{folder} already holds a joined node; use another --dir")
    config = await bootstrap.ensure_joined(
        folder, _token(args.token), national_system=args.national_system, listen=args.listen,
        gateway_listen=args.gateway_listen, discover_on=args.discover_on or None,
    )  # fmt: skip
    say(f"joined as node {config.node_id}")
    say(f"organisation: {config.organisation_name} ({config.organisation_id})")
    say(f"registry: {config.registry}")
    say(f"key, certificate, CA, network key and node.toml written to {folder}")
    try:
        config.check_dialable()
    except ConfigError as wildcard:
        say(f"note: {wildcard}")
    for key, address in (("listen", config.listen), ("gateway_listen", config.gateway_listen)):
        if address.rpartition(":")[2] == "0":
            say(
                f"note: {key} = {address}: the node takes a new port at every start, so "
                "clinicians' client files and peers lose it; for a real deployment give "
                "--listen/--gateway-listen (or set them in node.toml)"
            )
    return 0


def run_devnet(args: argparse.Namespace) -> int:
    """Run the network until a signal (0), a server dies (1) or the demo ends.

    Everything devnet creates is owner-only: the folders hold patient data.
    The umask is inherited by the servers and ingest processes it starts.
    """
    previous_umask = os.umask(0o077)
    # Until ``watch`` takes over, SIGTERM unwinds like Ctrl-C, so the
    # servers started so far are stopped rather than orphaned.
    previous_term = signal.signal(signal.SIGTERM, _interrupt)
    try:
        workdir = args.workdir or devnet.default_workdir()
        say(f"working folder: {workdir}")
        net = devnet.prepare(workdir, args.nodes, args.data, say, insecure=args.insecure_dev)
        with devnet.running(net):
            return _bring_up_and_run(net, args.demo)
    finally:
        os.umask(previous_umask)
        signal.signal(signal.SIGTERM, previous_term)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _bring_up_and_run(net: devnet.DevNet, demo: bool) -> int:
    devnet.start_registry(net)
    say(f"registry serving on {net.registry.address if net.registry else '?'}")
    asyncio.run(devnet.enrol(net, say))
    devnet.ingest_all(net, say)
    asyncio.run(devnet.add_clinicians(net))
    picks = demo_scenario.pick_patients(net.plan, net.national_system)
    keep = {p for p in (picks.shared, picks.single) if p}
    deny = {picks.denied} if picks.denied else set()
    asyncio.run(devnet.set_consent(net, keep, deny))
    devnet.start_nodes(net)
    asyncio.run(devnet.wait_published(net))
    devnet.write_client_files(net)
    network_json = devnet.write_network_json(net)
    for index, config in enumerate(net.configs):
        say(
            f"{config.node_id} ({config.organisation_name}): peers on "
            f"{net.node_address(index)}, clinicians on {net.gateway_address(index)}"
        )
    if demo:
        say(f"network description: {network_json}")
        missed = asyncio.run(demo_scenario.run(net, picks, sys.stdout))
        say(f"\nDatabases and logs stay in {net.workdir}")
        if missed:
            print(f"demo: {missed}", file=sys.stderr)
        return 1 if missed else 0
    client_file = net.node_dir(0) / "client.json"
    say(
        f"\nTry:  {_clinician_command()} --config {client_file} search "
        f"'{net.national_system}|<identifier>'\n"
        f"Addresses, databases and logs of every server: {network_json}\nStop with Ctrl-C."
    )
    return _watch_network(net)


def _watch_network(net: devnet.DevNet) -> int:
    """Run until Ctrl-C (0) or the registry stops (1: every node is stopped too, and said so).

    A node that stops is reported and the rest keep running, as in a real
    network: its peers answer for themselves and show it as unreachable.
    """
    watched = [s for s in (net.registry, *net.nodes) if s is not None]
    while (dead := watch(watched)) is not None:
        print(f"{dead.exit_description()}\n{dead.log_tail()}", file=sys.stderr)
        if dead is net.registry:
            rest = ", ".join(s.name for s in watched if s is not dead) or "no other server"
            print(f"stopping the network: {rest} (no network runs without its registry); "
                  f"databases and logs stay in {net.workdir}", file=sys.stderr)  # fmt: skip
            return 1
        print(f"the rest of the network keeps running; {dead.name} answers as unreachable",
              file=sys.stderr)  # fmt: skip
        watched.remove(dead)
    return 0


def _clinician_command() -> str:
    """The ``transmural`` script of this interpreter's environment: it may not be on PATH."""
    script = Path(sys.executable).parent / "transmural"
    return str(script) if script.is_file() else f"{sys.executable} -m tools.clinician"


def _node_count(text: str) -> int:
    """argparse type for --nodes: a whole number from 1 to MAX_NODES."""
    try:
        count = int(text)
    except ValueError:
        count = 0
    if not 1 <= count <= MAX_NODES:
        raise argparse.ArgumentTypeError(
            f"must be a whole number from 1 to {MAX_NODES}, not {text!r}"
        )
    return count


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="transmural-admin",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    i = sub.add_parser(
        "ingest",
        help="load FHIR R4 bundles (files or folders) into a node",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Exit codes:\n"
        "  0  every bundle was loaded (a bundle loaded before is loaded again: no duplicates)\n"
        "  1  some file or folder was refused: each is named on stderr, the rest were loaded\n"
        "  2  bad usage or configuration: nothing was loaded",
    )
    i.add_argument("--config", type=given_path, required=True, help="the node's TOML config")
    i.add_argument(
        "paths",
        type=given_path,
        nargs="+",
        metavar="PATH",
        help="a bundle file, or a folder whose *.json files are loaded (sub-folders are not)",
    )
    admin_consent.add_consent_commands(sub)
    _add_membership_commands(sub)
    admin_members.add_members_command(sub)
    _add_rejoin(sub)
    bootstrap.add_commands(sub)
    add_user_commands(sub)
    admin_audit.add_audit_commands(sub)
    d = sub.add_parser(
        "devnet",
        help="run a registry and N nodes on loopback",
        description="Run a registry and N nodes on loopback until Ctrl-C or SIGTERM (exit 0); "
        "exit 1 if the registry stops on its own (a node that stops is reported and the "
        "rest keep running). With --demo, run the scenario and exit.",
    )
    d.add_argument(
        "--nodes",
        type=_node_count,
        default=3,
        metavar="N",
        help=f"number of facility nodes, 1 to {MAX_NODES} (default 3)",
    )
    d.add_argument(
        "--data",
        type=given_path,
        metavar="DIR",
        help="folder of FHIR R4 bundles to spread over the nodes (default: synthetic Dutch data)",
    )
    d.add_argument(
        "--insecure-dev",
        action="store_true",
        help="plain gRPC, no certificates (development only; the demo never uses it)",
    )
    d.add_argument(
        "--workdir",
        type=given_path,
        metavar="DIR",
        help="working folder, made owner-only (default: a new temp folder)",
    )
    d.add_argument("--demo", action="store_true", help="run the scripted scenario and exit")
    return parser


def _ttl_hours(text: str) -> float:
    """argparse type for --ttl-hours: more than 0, at most the registry's limit."""
    limit = registry_const.MAX_INVITE_TTL_S / 3600
    try:
        hours = float(text)
    except ValueError:
        hours = 0.0
    if not 0 < hours <= limit:
        raise argparse.ArgumentTypeError(f"must be a number of hours above 0, at most {limit:g}")
    return hours


def _add_membership_commands(sub: argparse._SubParsersAction[OneLineParser]) -> None:
    """``network init``, ``invite``, ``revoke`` (operator) and ``join`` (facility)."""
    n = sub.add_parser("network", help="create the network (operator)")
    network_sub = n.add_subparsers(
        dest="network_command", required=True, metavar="COMMAND", help="init"
    )
    init = network_sub.add_parser(
        "init",
        help="make the network CA, the registry's certificate and the network key",
        description="Make a new network in DIR: CA key and certificate, the registry's key "
        "and certificate, and the network pseudonymisation key (private files mode 0600, "
        "folder 0700). Refuses a folder that already holds a network.",
    )
    init.add_argument(
        "--dir", type=given_path, required=True, metavar="DIR", help="the new network folder"
    )
    init.add_argument(
        "--name", default="Transmural", help="the network's name (default %(default)s)"
    )
    i = sub.add_parser(
        "invite",
        help="print a one-time invite token for an organisation (operator)",
        description="Record a one-time invite in the registry database and print its token "
        "on stdout (nothing else). Give the token to the facility; it runs `join`.",
    )
    i.add_argument(
        "--network-dir", type=given_path, required=True, metavar="DIR", help="the network folder"
    )
    i.add_argument(
        "--db",
        type=given_path,
        required=True,
        metavar="REGISTRY_DB",
        help="the registry's database",
    )
    i.add_argument("--org-id", required=True, metavar="ID", help="organisation id (URA, AGB)")
    i.add_argument("--org-name", required=True, metavar="NAME", help="organisation name")
    i.add_argument(
        "--category",
        choices=pki.ORGANISATION_CATEGORIES,
        help="kind of facility, written into its certificate (consent can name a kind)",
    )
    i.add_argument(
        "--node-id",
        metavar="ID",
        help="the node's id, [a-z0-9-]{1,64} (default: derived from --org-id)",
    )
    i.add_argument(
        "--registry",
        default="",
        metavar="JOIN_HOST:PORT",
        help="the registry's join address, as facilities reach it "
        "(default: none; join finds the registry on the LAN with zeroconf)",
    )
    i.add_argument(
        "--ttl-hours",
        type=_ttl_hours,
        default=registry_const.DEFAULT_INVITE_TTL_S / 3600,
        metavar="H",
        help="hours the invite stays valid (default %(default)g)",
    )
    r = sub.add_parser(
        "revoke",
        help="revoke every certificate of an organisation (operator)",
        description="Revoke the organisation's node certificates and drop its nodes from "
        "the directory and index. The registry refuses them within a second; nodes "
        "learn it from the registry.",
    )
    r.add_argument(
        "--db",
        type=given_path,
        required=True,
        metavar="REGISTRY_DB",
        help="the registry's database",
    )
    r.add_argument("--org-id", required=True, metavar="ID", help="the organisation to revoke")
    j = sub.add_parser(
        "join",
        help="join a network with an invite token (facility)",
        description="Make this node's key, have the registry sign its certificate and "
        "receive the network key. Writes node.key, node.crt, ca.crt, network.key and "
        "node.toml into NODE_DIR; refuses a folder that already holds a joined node.",
    )
    _add_token_arguments(j, "the invite token from the operator")
    j.add_argument(
        "--dir", type=given_path, required=True, metavar="NODE_DIR", help="the node's folder"
    )
    j.add_argument(
        "--national-system",
        default=BSN_SYSTEM,
        help="identifier system of the national patient id (default: BSN)",
    )
    j.add_argument(
        "--listen",
        default="127.0.0.1:0",
        help="peer port, host:port, written to node.toml (default 127.0.0.1:0)",
    )
    j.add_argument(
        "--gateway-listen", default="127.0.0.1:0",
        help="clinicians' port, host:port, written to node.toml (default 127.0.0.1:0)",
    )  # fmt: skip


def _add_rejoin(sub: argparse._SubParsersAction[OneLineParser]) -> None:
    r = sub.add_parser(
        "rejoin",
        help="a revoked node joins again with a new invite, keeping its settings and records",
        description="Use a new invite for the same node id (the operator: revoke, then "
        "invite --node-id ID) to replace the node's key and certificate where node.toml "
        "says; node.toml, the database and the audit log stay. Stop the node first.",
    )
    _add_token_arguments(r, "the new invite token from the operator")
    r.add_argument(
        "--config", type=given_path, required=True, metavar="NODE.toml", help="the node's config"
    )


def _add_token_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """TOKEN and --discover-on: how join and rejoin find the registry."""
    parser.add_argument("token", metavar="TOKEN", help=f"{what} (- reads it from stdin)")
    parser.add_argument(
        "--discover-on", nargs="+", default=[], metavar="ADDR",
        help="interface addresses to look for the registry on with zeroconf, when the "
        "token carries no address (default 127.0.0.1)",
    )  # fmt: skip


def _token(given: str) -> str:
    """The invite token; ``-`` reads it from standard input, unseen by ``ps``."""
    if given != "-":
        return given
    line = sys.stdin.readline().strip()
    if not line:
        raise ConfigError("TOKEN -: no invite token on standard input (its first line is read)")
    return line


async def run_rejoin(args: argparse.Namespace) -> int:
    config = await asyncio.to_thread(NodeConfig.load, args.config)
    done = await rejoin(_token(args.token), config, args.discover_on or None)
    say(
        f"re-joined as node {done.node.node_id} of {done.node.organisation_id}: new key and "
        f"certificate in {config.private_key} and {config.certificate}"
    )
    say("node.toml, the database and the audit log are as they were; start the node again")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        code = _run(args)
        sys.stdout.flush()  # here, where a reader gone early can be caught, not at exit
        return code
    except (TransmuralError, ProcessError) as error:
        print(f"transmural-admin: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader left (`| head`, `| true`): what it did not read was not wanted.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace) -> int:
    if args.command == "ingest":
        return asyncio.run(admin_ingest.ingest(args.config, args.paths))
    if args.command == "consent":
        return asyncio.run(admin_consent.run(args))
    if args.command == "network":
        return network_init(args.dir, args.name)
    if args.command == "invite":
        return asyncio.run(invite(args))
    if args.command == "revoke":
        return asyncio.run(revoke(args.db, args.org_id))
    if args.command == "members":
        return asyncio.run(admin_members.run(args.db, args.json))
    if args.command == "join":
        return asyncio.run(join(args))
    if args.command == "rejoin":
        return asyncio.run(run_rejoin(args))
    if args.command == "bootstrap":
        return asyncio.run(bootstrap.run(args, say))
    if args.command == "user":
        return asyncio.run(run_user_command(args))
    if args.command == "audit":
        return asyncio.run(admin_audit.run(args))
    return run_devnet(args)


if __name__ == "__main__":
    sys.exit(main())
