"""First start of a registry or a node, done once and then kept: what devnet and containers share.

Each step looks at what is there before it makes anything, so running it
again (a container restart) keeps every key, certificate and database and
changes nothing:

- ``ensure_network``: the operator's network folder (``init_network``) if
  there is none, else the one there, loaded and checked;
- ``write_invites``: on the registry's side, one invite token file
  (``<node id>.token``, 0600) for each node that has neither joined nor an
  open invite with a token file here, nor been revoked by the operator;
- ``ensure_joined``: on a node's side, join with the token (``tools.join``)
  and write ``node.toml`` if the folder holds no joined node, else load the
  config there (the token is not needed then).

``transmural-admin bootstrap registry|node`` runs these and says what each
did ("created" or "kept"); compose/entrypoint.sh runs that, then the server.
devnet's ``enrol`` joins its nodes through ``ensure_joined`` too.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from node.audit import AuditLog
from node.config import NodeConfig
from node.store import NodeStore
from registry import const as registry_const
from registry.enrolment import InviteRecord, Membership, revoke_command
from registry.index import check_node_id, check_text
from registry.network import FILES as NETWORK_FILES
from registry.network import NetworkFiles, init_network, load_network
from registry.store import RegistryStore
from tools import join as joining
from tools.admin_audit import join_record
from transmural import invite, pki
from transmural.clock import Clock, SystemClock, utc_iso
from transmural.errors import ConfigError, InvalidInput, Unavailable
from transmural.identifiers import BSN_SYSTEM, canonical_system
from transmural.process import OneLineParser, given_path

#: Inside a registry's data folder: the network folder and the database.
NETWORK_DIR = "network"
REGISTRY_DB = "registry.db"
#: Inside a node's folder (beside node.key, node.crt, ca.crt, network.key).
NODE_CONFIG = "node.toml"
TOKEN_SUFFIX = ".token"
DEFAULT_NETWORK_NAME = "Transmural"
#: Seconds between join attempts while the registry is not up yet (``--wait``).
JOIN_RETRY_S = 1.0


class InviteSpec(NamedTuple):
    """Who the registry invites on its first start: ``NODE_ID:ORG_ID:ORG_NAME``."""

    node_id: str
    organisation_id: str
    organisation_name: str

    @classmethod
    def parse(cls, text: str) -> InviteSpec:
        """``node-1:URA-90000001:Ziekenhuis Noord``; the name may hold ':', the ids not."""
        parts = text.split(":", 2)
        if len(parts) != 3:
            raise InvalidInput(f"{text!r} is not NODE_ID:ORG_ID:ORG_NAME")
        return cls(*parts).checked()

    def checked(self) -> InviteSpec:
        """The spec with its fields checked as the registry checks an invite."""
        return InviteSpec(
            check_node_id(self.node_id),
            check_text(
                self.organisation_id, "organisation id",
                registry_const.MAX_ORGANISATION_ID_LENGTH, required=True,
            ),
            check_text(
                self.organisation_name, "organisation name",
                registry_const.MAX_ORGANISATION_NAME_LENGTH, required=True,
            ),
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class InviteOutcome:
    """What ``write_invites`` did for one node."""

    node_id: str
    action: str  # "created" (a new token file), "kept" (the file there) or "none"
    path: Path
    detail: str


def token_path(invites_dir: Path, node_id: str) -> Path:
    """Where the registry writes node ``node_id``'s token and the node reads it."""
    return invites_dir / f"{check_node_id(node_id)}{TOKEN_SUFFIX}"


def has_network(network_dir: Path) -> bool:
    return any((network_dir / name).exists() for name in NETWORK_FILES)


def is_joined(node_dir: Path) -> bool:
    return (node_dir / NODE_CONFIG).exists()


def ensure_network(network_dir: Path, name: str = DEFAULT_NETWORK_NAME) -> NetworkFiles:
    """The network in ``network_dir``: made if absent, else loaded (ConfigError if incomplete)."""
    if has_network(network_dir):
        return load_network(network_dir)
    return init_network(network_dir, name)


async def write_invites(
    network_dir: Path,
    registry_db: Path,
    join_address: str,
    invites: list[InviteSpec] | list[tuple[str, str, str]],
    out_dir: Path,
    clock: Clock | None = None,
) -> list[InviteOutcome]:
    """One token file per node that has neither joined nor an open invite with a file here.

    A token file is kept while its invite is open or was used (the node
    joined); one whose invite expired unused, or that another registry
    issued, is replaced by a new invite. A node id that holds a certificate
    or an open invite without a token file here gets nothing (detail says why).
    Nor does a node the operator revoked (``transmural-admin revoke``) and
    has not invited again by hand since: this runs on every start of the
    registry's container, and a new token would undo the revocation.
    """
    clock = clock or SystemClock()
    specs = [InviteSpec(*spec).checked() for spec in invites]
    twice = sorted({s.node_id for s in specs if [t.node_id for t in specs].count(s.node_id) > 1})
    if twice:
        raise InvalidInput(f"node id {', '.join(twice)} is invited more than once")
    network = await asyncio.to_thread(load_network, network_dir)
    # Refuse a bad address before anything is written (the token would carry it).
    invite.InviteToken(join_address, network.ca_fingerprint, bytes(invite.SECRET_BYTES), 1)
    await asyncio.to_thread(_make_private_dir, out_dir)
    store = await RegistryStore.open(registry_db, clock)
    try:
        await store.bind_network(network.ca_fingerprint, network.name, clock.now())
        membership = Membership(store, ca_cert=network.ca_cert, clock=clock)
        outcomes = []
        for spec in specs:
            path = token_path(out_dir, spec.node_id)
            revoked = await _still_revoked(store, spec, path,
                                           (network_dir, registry_db, join_address))  # fmt: skip
            if revoked is not None:
                outcomes.append(InviteOutcome(spec.node_id, "none", path, revoked))
                continue
            kept = await _kept_token(store, path, network.ca_fingerprint, clock.now(),
                                     (spec, join_address))  # fmt: skip
            if kept is not None:
                outcomes.append(InviteOutcome(spec.node_id, "kept", path, kept))
                continue
            try:
                token = await membership.create_invite(
                    spec.organisation_id, spec.organisation_name, spec.node_id, join_address
                )
            except InvalidInput as taken:  # the fields were checked: the node id is taken
                pending = await store.open_invite(spec.node_id, clock.now())
                detail = str(taken) if pending is None else _lost_token(
                    pending, spec, path, (network_dir, registry_db, join_address))  # fmt: skip
                outcomes.append(InviteOutcome(spec.node_id, "none", path, detail))
                continue
            await asyncio.to_thread(_write_private, path, token + "\n")
            until = utc_iso(invite.decode(token).expires_at)
            outcomes.append(
                InviteOutcome(spec.node_id, "created", path, f"invite open until {until}")
            )
        return outcomes
    finally:
        await store.close()


async def _still_revoked(
    store: RegistryStore, spec: InviteSpec, path: Path, registry: tuple[Path, Path, str]
) -> str | None:
    """Why ``spec``'s node gets no new invite (the operator revoked it), or None.

    An invite made by hand since (``_invite_by_hand``), newer than the
    revocation, lifts this refusal.
    """
    revoked = await store.revoked_at(spec.node_id)
    if revoked is None:
        return None
    return (
        f"node {spec.node_id} (its certificate or its invite) was revoked at "
        f"{utc_iso(revoked)} and is not invited again, "
        f"which would undo that; if the facility is to come back, invite it by hand: "
        f"{_invite_by_hand(spec, path, registry)}"
    )


def _lost_token(
    pending: InviteRecord, spec: InviteSpec, path: Path, registry: tuple[Path, Path, str]
) -> str:
    """What to do when a node's invite is open but its token file is not here.

    Closing the invite is a revoke, so this run would not invite the node
    again afterwards (``_still_revoked``): the hand-made invite follows it.
    """
    org = pending.organisation_id
    return (
        f"it has a pending invite, open until {utc_iso(pending.expires_at)}, whose token "
        f"file {path} is gone; to invite it again now, close that invite with "
        f"{revoke_command(str(registry[1]), org)} (which revokes any certificate of {org} too), "
        f"then invite it by hand: {_invite_by_hand(spec, path, registry)}"
    )


def _invite_by_hand(spec: InviteSpec, path: Path, registry: tuple[Path, Path, str]) -> str:
    """The command that invites ``spec``'s node, its token (private) where the node reads it.

    ``registry`` is (network folder, database, join address), as ``write_invites`` got them.
    """
    network_dir, registry_db, join_address = registry
    again = shlex.join([
        "transmural-admin", "invite", "--network-dir", str(network_dir), "--db", str(registry_db),
        "--org-id", spec.organisation_id, "--org-name", spec.organisation_name,
        "--node-id", spec.node_id, "--registry", join_address,
    ])  # fmt: skip
    return f"(umask 077; {again} > {shlex.quote(str(path))})"


async def _kept_token(
    store: RegistryStore,
    path: Path,
    fingerprint: str,
    now: float,
    wanted: tuple[InviteSpec, str],
) -> str | None:
    """Why the token file at ``path`` stays (its invite is open or used), or None.

    An open invite for another organisation or join address than ``wanted``
    (the spec and address given now) is closed, to be replaced.
    """
    try:
        token = invite.decode(await asyncio.to_thread(path.read_text))
    except (OSError, InvalidInput):
        return None
    if token.ca_fingerprint != fingerprint:
        return None
    record = await store.get_invite(invite.secret_hash(token.secret))
    if record is None:
        return None
    if record.used_at is not None:
        return f"the node joined at {utc_iso(record.used_at)}"
    if record.expires_at <= now:
        return None
    spec, join_address = wanted
    if (record.organisation_id, record.organisation_name, token.registry) == (
        spec.organisation_id, spec.organisation_name, join_address
    ):  # fmt: skip
        return f"invite open until {utc_iso(record.expires_at)}"
    await store.close_invite(record.secret_hash, now)  # it says something else now: replaced
    return None


async def ensure_joined(
    node_dir: Path,
    token_text: str | None,
    *,
    node_id: str | None = None,
    national_system: str = BSN_SYSTEM,
    listen: str = "127.0.0.1:0",
    gateway_listen: str = "127.0.0.1:0",
    discover_on: list[str] | None = None,
    wait_s: float = 0.0,
) -> NodeConfig:
    """The node in ``node_dir``: joined with ``token_text`` and configured if new, else kept.

    ``node_id``, when given, is the id this node must have. A kept node must
    belong to the network the token (if any) invites to. ConfigError for a
    folder where an earlier join stopped before ``node.toml`` was written.
    The join is retried for up to ``wait_s`` while the registry is unreachable.
    """
    config_path = node_dir / NODE_CONFIG
    if await asyncio.to_thread(config_path.exists):
        config = await asyncio.to_thread(NodeConfig.load, config_path)
        _check_kept(config, node_id, token_text)
        return config
    present = [name for name in joining.FILES if (node_dir / name).exists()]
    if present:
        raise ConfigError(
            f"{node_dir} holds {', '.join(present)} but no {NODE_CONFIG}: an earlier join "
            "stopped half-way; empty the folder and join with a new invite"
        )
    if token_text is None:
        raise ConfigError(f"{node_dir} holds no joined node, and no invite token was given")
    _check_invited_id(token_text, node_id)
    joined = await _join(token_text, node_dir, discover_on, wait_s)
    if node_id is not None and joined.node_id != node_id:  # a token that did not say its node
        raise ConfigError(
            f"the invite was for node {joined.node_id}, not {node_id}: {node_dir} now holds "
            f"{joined.node_id}'s key and certificate; empty it and use {node_id}'s invite"
        )
    config = NodeConfig(
        node_id=joined.node_id, organisation_name=joined.organisation_name,
        organisation_id=joined.organisation_id, registry=joined.registry_endpoint,
        database=node_dir / "node.db", network_key_file=joined.paths.network_key,
        certificate=joined.paths.node_cert, private_key=joined.paths.node_key,
        ca_certificate=joined.paths.ca_cert, national_system=national_system,
        listen=listen, gateway_listen=gateway_listen,
    )  # fmt: skip
    await asyncio.to_thread(write_node_config, node_dir, config)
    await _audit_join(config)
    return config


async def _audit_join(config: NodeConfig) -> None:
    """The node's first audit record: it joined the network, as whom, via which registry."""
    store = await NodeStore.open(config.database)
    try:
        await AuditLog(store.database, SystemClock()).append(
            join_record(config.node_id, config.organisation_id, config.registry)
        )
    finally:
        await store.close()


def _check_invited_id(token_text: str, node_id: str | None) -> None:
    """Refuse another node's invite before joining uses it up (tokens that name their node)."""
    invited = invite.decode(token_text).node_id
    if node_id is not None and invited and invited != node_id:
        raise ConfigError(
            f"this invite is for node {invited}, not {node_id}; it is still unused: "
            f"give it to {invited} and use {node_id}'s own invite"
        )


def _check_kept(config: NodeConfig, node_id: str | None, token_text: str | None) -> None:
    if node_id is not None and config.node_id != node_id:
        raise ConfigError(f"this folder holds node {config.node_id}, not {node_id}")
    if token_text is None or config.ca_certificate is None:
        return
    try:
        wanted = invite.decode(token_text).ca_fingerprint
    except InvalidInput:
        return  # a joined node does not need its token: a damaged one is no reason to stop
    if pki.fingerprint(pki.read_certificate(config.ca_certificate)) != wanted:
        raise ConfigError(
            f"node {config.node_id} belongs to another network than the invite's (its CA "
            f"{config.ca_certificate} does not match): empty its folder to join the new one"
        )


def write_node_config(node_dir: Path, config: NodeConfig) -> Path:
    """``node.toml``, paths relative to ``node_dir``, written whole (0600) or not at all."""
    node_dir.mkdir(parents=True, exist_ok=True)
    path = node_dir / NODE_CONFIG
    _write_private(path, config.to_toml(node_dir))
    return path


async def _join(
    token_text: str, node_dir: Path, discover_on: list[str] | None, wait_s: float
) -> joining.JoinedNode:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return await joining.join(token_text, node_dir, discover_on)
        except Unavailable:
            if time.monotonic() + JOIN_RETRY_S > deadline:
                raise
        await asyncio.sleep(JOIN_RETRY_S)


def _make_private_dir(folder: Path) -> None:
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file (0600), then rename it over ``path``."""
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


# --- ``transmural-admin bootstrap registry|node`` ---


def add_commands(sub: argparse._SubParsersAction[OneLineParser]) -> None:
    """``bootstrap registry`` and ``bootstrap node``: first start, or nothing on a restart."""
    b = sub.add_parser(
        "bootstrap",
        help="first start of a registry or node; a restart keeps everything (containers)",
        allow_abbrev=False,  # scripts call these: a shortened flag is a mistake
    )
    roles = b.add_subparsers(dest="role", required=True, metavar="ROLE", help="registry | node")
    r = roles.add_parser(
        "registry",
        allow_abbrev=False,
        help="make the network unless there is one; invite the nodes not yet invited",
        description=f"Make DIR/{NETWORK_DIR} (CA, registry certificate, network key) and "
        f"DIR/{REGISTRY_DB} unless present; write <node id>{TOKEN_SUFFIX} (0600) into the "
        "invites folder for each --invite whose node has not joined, has no open invite and "
        "was not revoked (a revoked node is invited again only by hand).",
    )
    r.add_argument("--data", type=given_path, required=True, metavar="DIR", help="registry folder")
    r.add_argument(
        "--join-address", type=_join_address, required=True, metavar="HOST:PORT",
        help="the join port as nodes reach it (written into each token)",
    )  # fmt: skip
    r.add_argument(
        "--invite", type=_invite_spec, action="append", default=[],
        metavar="NODE_ID:ORG_ID:ORG_NAME", help="a node to invite (repeat for each)",
    )  # fmt: skip
    r.add_argument(
        "--invites-dir",
        type=given_path,
        metavar="DIR",
        help="where token files go (default DIR/invites)",
    )
    r.add_argument(
        "--name", default=DEFAULT_NETWORK_NAME, help="a new network's name (default %(default)s)"
    )
    n = roles.add_parser(
        "node",
        allow_abbrev=False,
        help="join with the token and write node.toml, unless the node has joined",
        description=f"If DIR holds no {NODE_CONFIG}: join with the token in FILE and write "
        f"{NODE_CONFIG}. Otherwise keep the node as it is (the token is not needed).",
    )
    n.add_argument(
        "--data", type=given_path, required=True, metavar="DIR", help="the node's folder"
    )
    n.add_argument(
        "--token-file", type=given_path, metavar="FILE", help="the invite token (first start)"
    )
    n.add_argument("--node-id", metavar="ID", help="refuse a token for another node id")
    n.add_argument(
        "--national-system", default=BSN_SYSTEM, metavar="URI",
        help="the national identifier system (default %(default)s)",
    )  # fmt: skip
    for flag, what in (("--listen", "peers"), ("--gateway-listen", "clinicians")):
        n.add_argument(
            flag, default="127.0.0.1:0", metavar="HOST:PORT",
            help=f"where the node serves {what} (written into a new node.toml)",
        )  # fmt: skip
    n.add_argument(
        "--wait", type=float, default=0.0, metavar="SECONDS",
        help="keep trying this long while the registry is not reachable (default 0)",
    )  # fmt: skip


def _join_address(text: str) -> str:
    """Checked with the arguments, before the network folder is made."""
    try:
        return invite.check_join_address(text)
    except InvalidInput as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _invite_spec(text: str) -> InviteSpec:
    try:
        return InviteSpec.parse(text)
    except InvalidInput as error:
        raise argparse.ArgumentTypeError(str(error)) from None


async def run(args: argparse.Namespace, say: Callable[[str], None]) -> int:
    if args.role == "registry":
        return await _bootstrap_registry(args, say)
    return await _bootstrap_node(args, say)


async def _bootstrap_registry(args: argparse.Namespace, say: Callable[[str], None]) -> int:
    folder = args.data / NETWORK_DIR
    existed = await asyncio.to_thread(has_network, folder)
    network = await asyncio.to_thread(ensure_network, folder, args.name)
    say(
        f"network {network.name!r} {'kept' if existed else 'created'} in {folder} "
        f"(CA fingerprint {network.ca_fingerprint})"
    )
    db = args.data / REGISTRY_DB
    existed = await asyncio.to_thread(db.exists)
    invites_dir = args.invites_dir or args.data / "invites"
    outcomes = await write_invites(folder, db, args.join_address, args.invite, invites_dir)
    say(f"registry database {'kept' if existed else 'created'}: {db}")
    for outcome in outcomes:
        if outcome.action == "none":
            say(f"{outcome.node_id}: no token written: {outcome.detail}")
        else:
            say(f"{outcome.node_id}: {outcome.action} {outcome.path} ({outcome.detail})")
    return 0


async def _bootstrap_node(args: argparse.Namespace, say: Callable[[str], None]) -> int:
    existed = await asyncio.to_thread(is_joined, args.data)
    token = await asyncio.to_thread(_read_token, args.token_file, required=not existed)
    asked = {
        "national_system": canonical_system(args.national_system),
        "listen": args.listen,
        "gateway_listen": args.gateway_listen,
    }
    config = await ensure_joined(args.data, token, node_id=args.node_id, wait_s=args.wait, **asked)
    say(
        f"node {config.node_id} {'kept' if existed else 'created'} in {args.data}: "
        f"{config.organisation_name} ({config.organisation_id}), registry {config.registry}"
    )
    for key, value in asked.items():
        if getattr(config, key) != value:
            say(f"note: {NODE_CONFIG} keeps {key} = {getattr(config, key)!r}, not {value!r}")
    return 0


def _read_token(path: Path | None, required: bool) -> str | None:
    if path is None:
        if required:
            raise ConfigError("this node has not joined yet: give --token-file")
        return None
    try:
        return path.read_text()
    except FileNotFoundError:
        if required:
            raise ConfigError(f"there is no invite token file {path}") from None
        return None
    except OSError as error:
        raise ConfigError(f"cannot read the invite token file {path}: {error.strerror}") from None
