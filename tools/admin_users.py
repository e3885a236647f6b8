"""``transmural-admin user add|list|remove``: clinician accounts on one node.

``add`` prints the clinician's bearer token once; only its hash is stored.
The clinician puts it in their client file (or TRANSMURAL_TOKEN). ``remove``
ends a clinician's access at once (a leaked token, someone who left).
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime

from node.config import NodeConfig
from node.records import UserRecord
from node.store import NodeStore
from node.users import DEFAULT_TOKEN_DAYS, ROLES, Clinicians
from tools.admin_audit import record_local
from tools.render import printable
from transmural.errors import NotFound
from transmural.process import given_path


def add_user_commands(sub: argparse._SubParsersAction) -> None:
    users = sub.add_parser("user", help="clinician accounts on a node")
    actions = users.add_subparsers(
        dest="user_command", required=True, metavar="ACTION", help="add, list or remove"
    )
    add = actions.add_parser(
        "add",
        help="add a clinician (or, with --replace, issue them a new token) and print the token",
        description="Add a clinician to a node's user store and print their bearer token "
        "on stdout, once. An existing id is refused unless --replace is given: then the "
        "account gets the name, role and a new token given here, and its old token stops "
        "working (a renewal, or a token to take back).",
    )
    add.add_argument("--config", type=given_path, required=True, help="the node's TOML config")
    add.add_argument("--id", dest="user_id", required=True, help="clinician id, e.g. dr.jansen")
    add.add_argument("--name", required=True, help="display name, e.g. 'Dr. J. Jansen'")
    add.add_argument("--role", required=True, choices=ROLES, help="role code")
    add.add_argument(
        "--days", type=int, default=DEFAULT_TOKEN_DAYS,
        help=f"days the token stays valid (default {DEFAULT_TOKEN_DAYS})",
    )  # fmt: skip
    add.add_argument(
        "--replace", action="store_true",
        help="the id exists: replace its account and token (the old token stops working)",
    )  # fmt: skip
    listing = actions.add_parser("list", help="every clinician of the node and when tokens expire")
    listing.add_argument("--config", type=given_path, required=True, help="the node's TOML config")
    remove = actions.add_parser(
        "remove", help="remove a clinician: their token stops working at once"
    )
    remove.add_argument("--config", type=given_path, required=True, help="the node's TOML config")
    remove.add_argument("--id", dest="user_id", required=True, help="the clinician's id")


async def run_user_command(args: argparse.Namespace) -> int:
    """``user add|list|remove``; NotFound (exit 1) for an unknown clinician to remove."""
    config = NodeConfig.load(args.config)
    # join made the database (its first audit record): a missing one is a wrong path.
    # Only an --insecure-dev node, which never joined, may start it here.
    store = await NodeStore.open(
        config.database,
        existing=args.user_command != "add" or not config.insecure_dev,
        node=config.identity,
    )
    try:
        clinicians = Clinicians(store)
        if args.user_command == "add":
            return await _add(store, clinicians, args)
        elif args.user_command == "list":
            _print_users(await clinicians.list())
        else:
            await clinicians.remove(args.user_id)
            await record_local(store, "user-remove", args.user_id)
            print(f"removed {args.user_id}: their token no longer works at this node")
    except NotFound as unknown:
        print(f"transmural-admin: {unknown}", file=sys.stderr)
        return 1
    finally:
        await store.close()
    return 0


async def _add(store: NodeStore, clinicians: Clinicians, args: argparse.Namespace) -> int:
    """Add, or with --replace re-issue; an existing id without it is exit 2, changing nothing."""
    existing = next((u for u in await clinicians.list() if u.user_id == args.user_id), None)
    if existing is not None and not args.replace:
        print(printable(
            f"transmural-admin: clinician {args.user_id} already exists ({existing.display_name}, "
            f"{existing.role}): give --replace to issue them a new token (their old one stops "
            "working), or choose another id"
        ), file=sys.stderr)  # fmt: skip
        return 2
    token = await clinicians.add(args.user_id, args.name, args.role, args.days)
    what = f"{args.user_id} ({args.role}), {args.days} days"
    if existing is not None:
        what += f"; replaced {existing.display_name} ({existing.role}): old token ended"
    await record_local(store, "user-add", what)
    print(token)
    return 0


def _print_users(users: list[UserRecord]) -> None:
    now = time.time()
    for user in users:
        expires = datetime.fromtimestamp(user.expires_at, UTC).strftime("%Y-%m-%d")
        state = "expired" if user.expires_at <= now else "expires"
        line = f"{user.user_id:<24} {user.role:<16} {state} {expires}  {user.display_name}"
        print(printable(line))
    if not users:
        print("no clinicians at this node: add one with `transmural-admin user add`")
