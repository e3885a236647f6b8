"""Clinicians of a node: tokens are issued once, stored hashed, and expire."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.store import NodeStore
from node.users import Clinicians, token_hash
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
        clinicians = Clinicians(store, clock)
        with pytest.raises(Unauthenticated, match="no clinician token"):
            await clinicians.authenticate("")
        with pytest.raises(Unauthenticated, match="not known"):
            await clinicians.authenticate("tmu1_made-up")
        old = await clinicians.add("nurse.a", "Nurse A", "nurse", days=1)
        new = await clinicians.add("nurse.a", "Nurse A", "nurse", days=1)
        with pytest.raises(Unauthenticated, match="not known"):
            await clinicians.authenticate(old)
        clock.t += 2 * 86400
        with pytest.raises(Unauthenticated, match="expired"):
            await clinicians.authenticate(new)
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("user_id", "name", "role", "says"),
    [
        ("", "A", "nurse", "user id"),
        ("a b", "A", "nurse", "user id"),
        ("ok", " ", "nurse", "display name"),
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
