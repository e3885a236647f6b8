"""Clinicians of this facility and their bearer tokens.

The gateway authenticates a clinician before it asks anyone anything: the
thin client sends ``authorization: Bearer <token>``; the token was issued
here by ``transmural-admin user add`` and only its SHA-256 is stored;
``user remove`` takes it away at once (``user list`` shows who has one).
Single sign-on (SAML, OIDC) plugs in by replacing ``authenticate`` with a
check of the identity provider's token that yields the same ``UserRecord``.

A refused token is an access attempt, so it is written to the audit log
(``sign-in``, denied, why, from which address; never the token): an admin
looking into a leaked or guessed token sees the attempts where every other
access is recorded. The log is append-only, so a caller without a token
must not be able to grow it at will: past REFUSALS_PER_MINUTE in a minute
the refusals are counted, and the count is written as one record when the
next minute's first sign-in (refused or not) comes.
"""

from __future__ import annotations

import hashlib
import re
import secrets

from node.audit import AuditLog, AuditRecord
from node.records import UserRecord
from node.store import NodeStore
from transmural.clock import Clock, SystemClock
from transmural.errors import InvalidInput, NotFound, Unauthenticated
from transmural.names import is_shown_name, with_plain_spaces

#: Role codes a clinician may have (what a peer's consent rules can refer to).
ROLES = ("physician", "nurse", "pharmacist", "midwife", "dentist", "physiotherapist")
USER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")
TOKEN_PREFIX = "tmu1_"
DEFAULT_TOKEN_DAYS = 90
#: Refused sign-ins written one by one per minute; more are written as one count.
REFUSALS_PER_MINUTE = 60
_MINUTE_S = 60.0


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class Clinicians:
    """Adds clinicians and recognises their tokens."""

    def __init__(
        self, store: NodeStore, clock: Clock | None = None, audit: AuditLog | None = None
    ) -> None:
        self._store = store
        self._clock = clock or SystemClock()
        self._audit = audit
        self._minute_started = self._clock.monotonic()
        self._refused_this_minute = 0
        self._uncounted = 0  # refusals this minute not written one by one

    async def add(
        self, user_id: str, display_name: str, role: str, days: int = DEFAULT_TOKEN_DAYS
    ) -> str:
        """Add (or re-issue) a clinician; returns the token, shown only this once."""
        if not USER_ID.fullmatch(user_id):
            raise InvalidInput("user id: 1-128 letters, digits and . _ @ -, starting alphanumeric")
        # Answering nodes refuse an assertion whose name is not printable
        # (node/assertions.py): such a clinician could sign in and never be answered.
        display_name = with_plain_spaces(display_name)
        if len(display_name) > 200 or not is_shown_name(display_name.strip()):
            raise InvalidInput(
                "display name must be 1 to 200 printable characters with a letter or digit "
                f"(no control, invisible or line-break characters), not {display_name!r}"
            )
        if role not in ROLES:
            raise InvalidInput(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        if not 1 <= days <= 3650:
            raise InvalidInput("a token lives 1 to 3650 days")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        expires_at = int(self._clock.now()) + days * 86400
        user = UserRecord(user_id, display_name.strip(), role, expires_at)
        await self._store.put_user(user, token_hash(token))
        return token

    async def list(self) -> list[UserRecord]:
        return await self._store.users()

    async def remove(self, user_id: str) -> None:
        """End a clinician's access (a leaked token, someone who left); NotFound if unknown."""
        if not await self._store.remove_user(user_id):
            raise NotFound(f"no clinician {user_id!r} at this node")

    async def authenticate(self, token: str, address: str = "") -> UserRecord:
        """The clinician a bearer token belongs to; Unauthenticated (audited) otherwise.

        ``address`` is where the call came from, for the audit record.
        """
        await self._next_minute()
        if not token:
            await self._refused(address, "no clinician token was sent")
            raise Unauthenticated("sign in first: no clinician token was sent")
        user = await self._store.user_by_token_hash(token_hash(token))
        if user is None:
            await self._refused(address, "the token is not known at this node")
            raise Unauthenticated("this clinician token is not known at this node")
        if user.expires_at <= self._clock.now():
            await self._refused(address, "the token has expired", user)
            raise Unauthenticated("this clinician token has expired: ask for a new one")
        return user

    async def _next_minute(self) -> None:
        """Start a new minute once one has passed, first writing what the last one counted."""
        now = self._clock.monotonic()
        if now - self._minute_started < _MINUTE_S:
            return
        uncounted, self._uncounted = self._uncounted, 0
        self._minute_started, self._refused_this_minute = now, 0
        if uncounted and self._audit is not None:
            await self._audit.append(
                AuditRecord(
                    action="sign-in", outcome="denied", side="local",
                    outcome_reason=f"{uncounted} more refused sign-ins in that minute, over "
                    f"{REFUSALS_PER_MINUTE} written one by one",
                )
            )  # fmt: skip

    async def _refused(self, address: str, reason: str, user: UserRecord | None = None) -> None:
        self._refused_this_minute += 1
        if self._refused_this_minute > REFUSALS_PER_MINUTE:
            self._uncounted += 1
            return
        if self._audit is not None:
            await self._audit.append(
                AuditRecord(
                    action="sign-in", outcome="denied", side="local", outcome_reason=reason,
                    clinician_id=user.user_id if user else "", role=user.role if user else "",
                    requesting_address=address,
                )
            )  # fmt: skip
