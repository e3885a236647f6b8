"""Clinicians of a node: tokens are issued once, stored hashed, and expire."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from node.audit import AuditLog
from node.store import NodeStore
from node.users import REFUSALS_PER_MINUTE, Clinicians, token_hash
from tests.test_admin import node_config
from transmural.errors import InvalidInput, Unauthenticated


class FakeClock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.t = now

    def now(self) -> float:
        return self.t

    def monotonic(self) -> float:
        return self.t


async def test_token_identifies_the_clinician_and_is_stored_hashed(tmp_path: Path) -> None:
    store = await NodeStore.open(tmp_path / "node.db")
    try:
        clinicians = Clinicians(store, FakeClock())
        token = await clinicians.add("dr.jansen", "Dr. J. Jansen", "physician")
        user = await clinicians.authenticate(token)
        assert (user.user_id, user.display_name, user.role) == (
            "dr.jansen",
            "Dr. J. Jansen",
            "physician",
        )
        assert await store.user_by_token_hash(token_hash(token)) is not None
    finally:
        await store.close()
    assert token.encode() not in (tmp_path / "node.db").read_bytes()


async def test_unknown_expired_and_replaced_tokens_refused(tmp_path: Path) -> None:
    store = await NodeStore.open(tmp_path / "node.db")
    clock = FakeClock()
    try:
        audit = AuditLog(store.database, clock)
        clinicians = Clinicians(store, clock, audit)
        with pytest.raises(Unauthenticated, match="no clinician token"):
            await clinicians.authenticate("", "ipv4:127.0.0.1:5000")
        with pytest.raises(Unauthenticated, match="not known"):
            await clinicians.authenticate("tmu1_made-up")
        old = await clinicians.add("nurse.a", "Nurse A", "nurse", days=1)
        new = await clinicians.add("nurse.a", "Nurse A", "nurse", days=1)
        with pytest.raises(Unauthenticated, match="not known"):
            await clinicians.authenticate(old)
        clock.t += 2 * 86400
        with pytest.raises(Unauthenticated, match="expired"):
            await clinicians.authenticate(new)
        await clinicians.authenticate(await clinicians.add("nurse.b", "Nurse B", "nurse"))
    finally:
        await store.close()
    with sqlite3.connect(tmp_path / "node.db") as db:
        refused = db.execute(
            "SELECT outcome, outcome_reason, clinician_id, requesting_address FROM audit_log"
            " WHERE action = 'sign-in' ORDER BY seq"
        ).fetchall()
    # Every refusal is an audited access attempt (a good sign-in is audited by what it asks).
    assert refused == [
        ("denied", "no clinician token was sent", "", "ipv4:127.0.0.1:5000"),
        ("denied", "the token is not known at this node", "", ""),
        ("denied", "the token is not known at this node", "", ""),
        ("denied", "the token has expired", "nurse.a", ""),
    ]
    assert old.encode() not in (tmp_path / "node.db").read_bytes()


@pytest.mark.parametrize(
    ("user_id", "name", "role", "says"),
    [
        ("", "A", "nurse", "user id"),
        ("a b", "A", "nurse", "user id"),
        ("ok", " ", "nurse", "display name"),
        ("ok", "Dr\u200bX", "nurse", "printable characters"),
        ("ok", "Dr \u202eX", "nurse", "printable characters"),
        ("ok", "Dr\nX", "nurse", "printable characters"),
        ("ok", "Dr\x85X", "nurse", "printable characters"),
        ("ok", "\u3164", "nurse", "printable characters"),
        ("ok", "Dr.\u115fX", "nurse", "printable characters"),
        ("ok", "---", "nurse", "with a letter or digit"),
        ("zz\n", "A", "nurse", "user id"),
        ("ok", "A", "surgeon-general", "role must be one of"),
    ],
)
async def test_bad_user_refused(
    tmp_path: Path, user_id: str, name: str, role: str, says: str
) -> None:
    store = await NodeStore.open(tmp_path / "node.db")
    try:
        with pytest.raises(InvalidInput, match=says):
            await Clinicians(store, FakeClock()).add(user_id, name, role)
    finally:
        await store.close()


def test_user_add_command_prints_a_working_token(tmp_path: Path) -> None:
    node_config(tmp_path)  # node.toml and node.db beside it
    command = [sys.executable, "-m", "tools.admin", "user", "add", "--config",
               str(tmp_path / "node.toml"), "--id", "dr.a", "--name", "Dr. A"]  # fmt: skip
    ok = subprocess.run([*command, "--role", "nurse"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    token = ok.stdout.strip()
    assert token.startswith("tmu1_") and "\n" not in token
    bad = subprocess.run([*command, "--role", "king"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--role" in bad.stderr

    async def check() -> str:
        store = await NodeStore.open(tmp_path / "node.db")
        try:
            return (await Clinicians(store, FakeClock()).authenticate(token)).role
        finally:
            await store.close()

    assert asyncio.run(check()) == "nurse"


def test_user_list_and_remove_commands(tmp_path: Path) -> None:
    node_config(tmp_path)  # node.toml and node.db beside it

    def admin(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tools.admin", "user", *args,
                               "--config", str(tmp_path / "node.toml")],
                              capture_output=True, text=True)  # fmt: skip

    for user_id in ("dr.a", "dr.b"):
        assert (
            admin("add", "--id", user_id, "--name", f"Dr. {user_id}", "--role", "nurse").returncode
            == 0
        )
    listed = admin("list")
    assert listed.returncode == 0
    assert [line.split()[0] for line in listed.stdout.splitlines()] == ["dr.a", "dr.b"]
    assert "nurse" in listed.stdout and "expires" in listed.stdout
    again = admin("add", "--id", "dr.a", "--name", "Dr. Other", "--role", "physician")
    assert again.returncode == 2 and "already exists (Dr. dr.a, nurse)" in again.stderr
    assert not again.stdout  # no token issued, the account unchanged
    replaced = admin("add", "--id", "dr.a", "--name", "Dr. A", "--role", "nurse", "--replace")
    token_a = replaced.stdout.strip()
    assert replaced.returncode == 0 and token_a.startswith("tmu1_")

    removed = admin("remove", "--id", "dr.a")
    assert removed.returncode == 0 and "removed dr.a" in removed.stdout
    assert [line.split()[0] for line in admin("list").stdout.splitlines()] == ["dr.b"]
    unknown = admin("remove", "--id", "dr.a")
    assert unknown.returncode == 1 and "no clinician 'dr.a'" in unknown.stderr

    async def refused() -> None:
        store = await NodeStore.open(tmp_path / "node.db")
        try:
            with pytest.raises(Unauthenticated, match="not known"):
                await Clinicians(store).authenticate(token_a)
        finally:
            await store.close()

    asyncio.run(refused())
    with sqlite3.connect(tmp_path / "node.db") as db:
        logged = db.execute("SELECT action, outcome_reason FROM audit_log ORDER BY seq").fetchall()
    assert [action for action, _ in logged] == ["user-add"] * 3 + ["user-remove"]
    assert logged[-1][1] == "dr.a" and all("tmu1_" not in reason for _, reason in logged)
    assert "replaced Dr. dr.a (nurse): old token ended" in logged[2][1]


async def test_a_flood_of_refused_tokens_cannot_grow_the_audit_log_at_will(tmp_path: Path) -> None:
    store = await NodeStore.open(tmp_path / "node.db")
    clock = FakeClock()
    try:
        clinicians = Clinicians(store, clock, AuditLog(store.database, clock))
        for _ in range(REFUSALS_PER_MINUTE + 5):
            with pytest.raises(Unauthenticated):
                await clinicians.authenticate("tmu1_guess")
        clock.t += 61
        with pytest.raises(Unauthenticated):
            await clinicians.authenticate("tmu1_guess")
    finally:
        await store.close()
    with sqlite3.connect(tmp_path / "node.db") as db:
        reasons = [r[0] for r in db.execute(
            "SELECT outcome_reason FROM audit_log WHERE action = 'sign-in' ORDER BY seq"
        )]  # fmt: skip
    assert len(reasons) == REFUSALS_PER_MINUTE + 2
    assert reasons[-2] == (
        f"5 more refused sign-ins in that minute, over {REFUSALS_PER_MINUTE} written one by one"
    )
    assert reasons[-1] == reasons[0] == "the token is not known at this node"
