"""``transmural-admin user add``: a clinician account on one node.

Prints the clinician's bearer token once; only its hash is stored. The
clinician puts it in their client file (or TRANSMURAL_TOKEN).
"""

from __future__ import annotations

import argparse

from node.config import NodeConfig
from node.store import NodeStore
from node.users import DEFAULT_TOKEN_DAYS, ROLES, Clinicians
from transmural.process import given_path


def add_user_commands(sub: argparse._SubParsersAction) -> None:
    users = sub.add_parser("user", help="clinician accounts on a node")
    actions = users.add_subparsers(
        dest="user_command", required=True, metavar="ACTION", help="what to do: add"
    )
    add = actions.add_parser(
        "add",
        help="add a clinician (or issue them a new token) and print the token",
        description="Add a clinician to a node's user store and print their bearer token "
        "on stdout, once. Adding an existing id replaces their token.",
    )
    add.add_argument("--config", type=given_path, required=True, help="the node's TOML config")
    add.add_argument("--id", dest="user_id", required=True, help="clinician id, e.g. dr.jansen")
    add.add_argument("--name", required=True, help="display name, e.g. 'Dr. J. Jansen'")
    add.add_argument("--role", required=True, choices=ROLES, help="role code")
    add.add_argument(
        "--days", type=int, default=DEFAULT_TOKEN_DAYS,
        help=f"days the token stays valid (default {DEFAULT_TOKEN_DAYS})",
    )  # fmt: skip


async def add_user(args: argparse.Namespace) -> int:
    config = NodeConfig.load(args.config)
    store = await NodeStore.open(config.database)
    try:
        token = await Clinicians(store).add(args.user_id, args.name, args.role, args.days)
    finally:
        await store.close()
    print(token)
    return 0
