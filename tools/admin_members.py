"""``transmural-admin members``: who is in the network, as the registry database says.

The operator's view of membership: every node that joined (its newest
certificate, whether it is revoked, where it last registered), the invites
still open, and those that ended unused. It opens the database read-only,
so it can run beside the serving registry and never changes it.

``--json`` prints this (stable: keys are only added; ``schema_version``
changes if a key changes meaning; times are UTC ISO 8601, null when absent):

    {"schema_version": 1, "at": time of the reading,
     "nodes": [{"node_id", "organisation_id", "organisation_name",
                "organisation_category" ("" if none),
                "state": "serving" | "revoked" | "expired",
                "certificate_serial", "issued_at", "not_after", "days_left",
                "revoked_at", "earlier_serials": [serials before a re-join],
                "endpoint" (null when not in the directory), "last_registered_at"}],
     "open_invites": [{"node_id", "organisation_id", "organisation_name",
                       "organisation_category", "created_at", "expires_at"}],
     "ended_invites": [{... as open_invites, "ended": "revoked" | "replaced"
                        | "expired", "ended_at"}],
     "uncertified": [{"node_id", "organisation_id", "organisation_name",
                      "endpoint", "last_registered_at"}],
     "summary": {"serving", "revoked", "expired", "open_invites"}}

``uncertified`` are directory entries with no certificate from this
registry (an ``--insecure-dev`` network's nodes).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from registry import operator
from registry.enrolment import CLOSED_REPLACED, CLOSED_REVOKED
from registry.index import NodeRecord
from registry.operator import MemberInvite, MemberNode, Members
from tools.render import counted, printable
from transmural.clock import utc_iso
from transmural.process import given_path

SCHEMA_VERSION = 1
#: Widest an organisation cell gets in the table before it is cut.
ORGANISATION_WIDTH = 48

_ENDED = {
    CLOSED_REVOKED: "withdrawn {at} (organisation revoked)",
    CLOSED_REPLACED: "withdrawn {at} (replaced by a new invite)",
    operator.ENDED_EXPIRED: "expired unused {at}",
}


def add_members_command(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser(
        "members",
        help="list the network's nodes and invites from the registry database (operator)",
        description="Show every node that joined (organisation, certificate and its expiry, "
        "revoked or not, where and when it last registered), the open invites and those "
        "ended unused, then a one-line summary. Opens the database read-only: it runs "
        "beside the registry and changes nothing.",
    )
    m.add_argument(
        "--db", type=given_path, required=True, metavar="REGISTRY_DB",
        help="the registry's database (never created: it must exist)",
    )  # fmt: skip
    m.add_argument("--json", action="store_true", help="print JSON (stable shape) for scripts")


async def run(db: Path, as_json: bool) -> int:
    found = await operator.members(db)
    print(json.dumps(members_json(found), indent=2) if as_json else "\n".join(members_text(found)))
    return 0


# --- for people ---


def members_text(members: Members) -> list[str]:
    """Nodes, open invites and ended ones as plain tables, then the summary line."""
    lines: list[str] = []
    if members.nodes:
        lines += [f"nodes that joined ({len(members.nodes)}):"]
        lines += _table(
            ("organisation", "node", "state", "certificate", "not after", "last registered"),
            [_node_row(node, members.now) for node in members.nodes],
        )
    if members.open_invites:
        lines += [f"open invites ({len(members.open_invites)}):"]
        lines += _table(
            ("organisation", "node", "created", "expires"),
            [[_organisation(i), i.node_id, utc_iso(i.created_at), utc_iso(i.expires_at)]
             for i in members.open_invites],
        )  # fmt: skip
    if members.ended_invites:
        lines += [f"invites ended unused ({len(members.ended_invites)}):"]
        lines += _table(
            ("organisation", "node", "ended"), [_ended_row(i) for i in members.ended_invites]
        )
    if members.uncertified:
        lines += [
            f"registered without a certificate from this registry ({len(members.uncertified)}):"
        ]
        lines += _table(
            ("organisation", "node", "last registered"),
            [[_org(n.organisation_id, n.organisation_name), n.node_id, _registered_entry(n)]
             for n in members.uncertified],
        )  # fmt: skip
    return [*lines, summary_line(members)]


def summary_line(members: Members) -> str:
    line = (
        f"{counted(members.count(operator.SERVING), 'node')} serving, "
        f"{members.count(operator.REVOKED)} revoked, "
        f"{counted(len(members.open_invites), 'open invite')}"
    )
    expired = members.count(operator.EXPIRED)
    return line + (f", {expired} with an expired certificate" if expired else "")


def expiry(not_after: float, now: float) -> str:
    """A certificate's end as the operator needs it: the date, and how soon."""
    left = days_left(not_after, now)
    if left < 0:
        return f"{utc_iso(not_after)[:10]}, EXPIRED"
    soon = "within a day" if left == 0 else f"in {counted(left, 'day')}"
    return f"{utc_iso(not_after)[:10]}, expires {soon}"


def days_left(not_after: float, now: float) -> int:
    """Whole days until ``not_after``; -1 once it is past."""
    return -1 if not_after <= now else math.floor((not_after - now) / 86400)


def _node_row(node: MemberNode, now: float) -> list[str]:
    state = f"revoked {utc_iso(node.revoked_at)}" if node.revoked_at is not None else node.state
    if node.earlier_serials:
        state += f" (re-joined; {counted(len(node.earlier_serials), 'earlier certificate')})"
    if node.last_registered_at is not None:
        registered = f"{utc_iso(node.last_registered_at)} from {node.endpoint}"
    else:
        # A revoke drops the node from the directory: whether it registered before is gone.
        registered = "-" if node.revoked_at is not None else "not registered"
    return [_organisation(node), node.node_id, state, node.serial, expiry(node.not_after, now),
            registered]  # fmt: skip


def _ended_row(invite: MemberInvite) -> list[str]:
    at = utc_iso(invite.ended_at) if invite.ended_at is not None else "?"
    return [_organisation(invite), invite.node_id, _ENDED[invite.ended].format(at=at)]


def _registered_entry(node: NodeRecord) -> str:
    return f"{utc_iso(node.updated_at)} from {node.endpoint}"


def _organisation(member: MemberNode | MemberInvite) -> str:
    text = _org(member.organisation_id, member.organisation_name)
    return f"{text} ({member.organisation_category})" if member.organisation_category else text


def _org(organisation_id: str, name: str) -> str:
    return f"{organisation_id}  {name}" if name else organisation_id


def _table(titles: Sequence[str], rows: list[list[str]]) -> list[str]:
    """Indented columns; every cell escaped (names come from invites and old databases)."""
    cells = [[printable(cell) for cell in row] for row in [list(titles), *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(titles))]
    widths[0] = min(widths[0], ORGANISATION_WIDTH)
    return [
        "  " + "  ".join(_cut(c, w).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in cells
    ]


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


# --- for scripts ---


def members_json(members: Members) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "at": utc_iso(members.now),
        "nodes": [_node_json(node, members.now) for node in members.nodes],
        "open_invites": [_invite_json(i) for i in members.open_invites],
        "ended_invites": [
            {**_invite_json(i), "ended": i.ended, "ended_at": _time(i.ended_at)}
            for i in members.ended_invites
        ],
        "uncertified": [_uncertified_json(n) for n in members.uncertified],
        "summary": {
            "serving": members.count(operator.SERVING),
            "revoked": members.count(operator.REVOKED),
            "expired": members.count(operator.EXPIRED),
            "open_invites": len(members.open_invites),
        },
    }


def _node_json(node: MemberNode, now: float) -> dict[str, Any]:
    return {
        "node_id": node.node_id,
        "organisation_id": node.organisation_id,
        "organisation_name": node.organisation_name,
        "organisation_category": node.organisation_category,
        "state": node.state,
        "certificate_serial": node.serial,
        "issued_at": utc_iso(node.issued_at),
        "not_after": utc_iso(node.not_after),
        "days_left": days_left(node.not_after, now),
        "revoked_at": _time(node.revoked_at),
        "earlier_serials": list(node.earlier_serials),
        "endpoint": node.endpoint if node.last_registered_at is not None else None,
        "last_registered_at": _time(node.last_registered_at),
    }


def _invite_json(invite: MemberInvite) -> dict[str, Any]:
    return {
        "node_id": invite.node_id,
        "organisation_id": invite.organisation_id,
        "organisation_name": invite.organisation_name,
        "organisation_category": invite.organisation_category,
        "created_at": utc_iso(invite.created_at),
        "expires_at": utc_iso(invite.expires_at),
    }


def _uncertified_json(node: NodeRecord) -> dict[str, Any]:
    return {
        "node_id": node.node_id,
        "organisation_id": node.organisation_id,
        "organisation_name": node.organisation_name,
        "endpoint": node.endpoint,
        "last_registered_at": utc_iso(node.updated_at),
    }


def _time(epoch: float | None) -> str | None:
    return utc_iso(epoch) if epoch is not None else None
