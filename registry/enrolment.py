"""Membership: invites, joins, certificates and revocations (DESIGN flow 2).

Nothing here knows about gRPC or SQL. ``Membership`` decides; a storage
object behind ``MembershipStorage`` keeps the result, each method one
transaction.

- ``create_invite`` (run by the admin CLI beside the registry) records
  the SHA-256 of a fresh secret with the organisation it admits and
  returns the token text; the secret itself is never stored.
- ``join`` (the registry's join port) checks a presented secret, signs the
  node's CSR with the identity from the invite (never from the CSR) and
  wraps the network key for the CSR's public key. Marking the invite used
  and recording the certificate are one transaction, so a token admits one
  node even when two joins race. A refused join changes nothing.
- ``revoke`` (the admin CLI) records revocations and removes the revoked
  nodes from the directory and the index; ``is_revoked`` is what the
  mutual-TLS interceptor asks on every call. It reads an in-memory set
  that ``refresh_revocations`` reloads from the database (the registry does
  so every ``REVOCATION_REFRESH_S``), because ``revoke`` runs in another
  process.
"""

from __future__ import annotations

import logging
import re
import shlex
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from registry import const
from registry.index import NodeRecord, check_node_id, check_text
from transmural import invite, keywrap, pki
from transmural.clock import Clock, SystemClock, utc_iso
from transmural.errors import InvalidInput, NotFound, PermissionDenied
from transmural.names import is_shown_name, with_plain_spaces

log = logging.getLogger(__name__)

UNKNOWN_INVITE = "this invite token is not known to the registry"
#: Why the operator closed an invite before it expired (``InviteRecord.closed_because``).
CLOSED_REVOKED = "revoked"  # its organisation was revoked (``transmural-admin revoke``)
CLOSED_REPLACED = "replaced"  # a new invite for its node took its place (``bootstrap registry``)


@dataclass(frozen=True, slots=True)
class InviteRecord:
    """What the registry keeps of an invite: never the secret, only its hash."""

    secret_hash: bytes
    node_id: str
    organisation_id: str
    organisation_name: str
    created_at: float
    expires_at: float
    used_at: float | None = None
    organisation_category: str = ""
    closed_at: float | None = None  # when the operator withdrew it (expires_at set to it too)
    closed_because: str | None = None  # CLOSED_REVOKED or CLOSED_REPLACED, with closed_at


@dataclass(frozen=True, slots=True)
class CertificateRecord:
    """A node certificate the registry issued."""

    serial: str  # lowercase hex, as ``pki.identity`` reads it
    node_id: str
    organisation_id: str
    issued_at: float
    not_after: float


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    """A certificate with whom it was issued to and its revocation: one line of membership.

    The name and category come from the invite it redeemed (the certificate
    table keeps neither); "" for a certificate whose invite is gone.
    """

    certificate: CertificateRecord
    organisation_name: str
    organisation_category: str
    revoked_at: float | None


@dataclass(frozen=True, slots=True)
class MembershipRows:
    """Every certificate, every unused invite and the directory, read at one moment."""

    certificates: list[IssuedCertificate]  # by organisation id, node id, newest first
    unused_invites: list[InviteRecord]  # open, closed by the operator or expired
    directory: list[NodeRecord]


@dataclass(frozen=True, slots=True)
class RevocationRecord:
    serial: str
    node_id: str
    organisation_id: str
    revoked_at: float


@dataclass(frozen=True, slots=True)
class Member:
    """Who a joined node is: from the invite, written into its certificate."""

    node_id: str
    organisation_id: str
    organisation_name: str
    organisation_category: str = ""


@dataclass(frozen=True, slots=True)
class JoinResult:
    certificate_der: bytes
    ca_certificate_der: bytes
    wrapped_network_key: bytes  # keywrap for the CSR's key, NETWORK_KEY_CONTEXT
    member: Member


class MembershipStorage(Protocol):
    """What membership needs from storage; each method is one transaction."""

    async def add_invite(self, record: InviteRecord, now: float) -> str | None:
        """Insert unless the node id is taken; else what holds it: "certificate", "invite",
        "organisation <id>" (another organisation had it) or "category <c>" (it joined
        before as another kind of facility)."""
        ...

    async def get_invite(self, secret_hash: bytes) -> InviteRecord | None: ...

    async def open_invite(self, node_id: str, now: float) -> InviteRecord | None:
        """The newest unused, unexpired invite for ``node_id``, if any."""
        ...

    async def redeem_invite(
        self, secret_hash: bytes, certificate: CertificateRecord, now: float
    ) -> bool:
        """Mark the invite used and record the certificate, if still unused and unexpired."""
        ...

    async def revoke_organisation(
        self, organisation_id: str, now: float
    ) -> tuple[int, list[RevocationRecord]]:
        """Revoke every unrevoked certificate of the organisation and drop its nodes
        from the directory and index; (certificates it ever had, new revocations)."""
        ...

    async def revocations(self) -> list[RevocationRecord]: ...

    async def close_open_invites(self, organisation_id: str, now: float) -> int:
        """End the organisation's unused invites; how many there were."""
        ...


def node_id_for(organisation_id: str) -> str:
    """A node id derived from an organisation id: "URA 12345678" -> "ura-12345678"."""
    slug = re.sub(r"[^a-z0-9]+", "-", organisation_id.lower()).strip("-")[:64].strip("-")
    if not slug:
        raise InvalidInput(
            f"cannot derive a node id from the organisation id {organisation_id!r}: "
            "give one with --node-id"
        )
    return slug


def revoke_command(registry_db: str, organisation_id: str) -> str:
    """The ``transmural-admin revoke`` that closes the organisation's open invites now."""
    return shlex.join(["transmural-admin", "revoke", "--db", registry_db,
                       "--org-id", organisation_id])  # fmt: skip


def _utc(epoch: float) -> str:
    return utc_iso(epoch).replace("T", " ").replace("+00:00", " UTC")


def _withdrawn(record: InviteRecord, closed_at: float) -> str:
    """Why a closed invite is refused: not "expired", which it would otherwise say."""
    if record.closed_because == CLOSED_REPLACED:
        return (
            f"this invite was withdrawn by the operator at {_utc(closed_at)}: a new invite "
            f"for node {record.node_id} replaced it; use the new one"
        )
    return (
        f"this invite was withdrawn by the operator at {_utc(closed_at)}: organisation "
        f"{record.organisation_id} was revoked; ask the operator whether to invite it again"
    )


class Membership:
    """Invites, joins and revocations of one network."""

    def __init__(
        self,
        storage: MembershipStorage,
        *,
        ca_cert: x509.Certificate | None = None,
        ca_key: pki.PrivateKey | None = None,
        network_key: bytes | None = None,
        clock: Clock | None = None,
    ) -> None:
        """Each operation needs only some of the network's secrets: ``revoke``
        none, ``create_invite`` the CA certificate (for its fingerprint),
        ``join`` the CA key and the network key too. The admin CLI passes
        only what its command needs."""
        self._storage = storage
        self._ca_cert = ca_cert
        self._ca_key = ca_key
        self._network_key = network_key
        self._clock = clock or SystemClock()
        self._revoked: frozenset[str] = frozenset()

    async def create_invite(
        self,
        organisation_id: str,
        organisation_name: str,
        node_id: str | None = None,
        join_address: str = "",
        ttl_s: int = const.DEFAULT_INVITE_TTL_S,
        organisation_category: str = "",
    ) -> str:
        """Record a one-time invite and return its token text (print it, store nothing else)."""
        if organisation_category and organisation_category not in pki.ORGANISATION_CATEGORIES:
            raise InvalidInput(
                f"organisation category must be one of {', '.join(pki.ORGANISATION_CATEGORIES)}, "
                f"not {organisation_category!r}"
            )
        org_id = check_text(
            organisation_id, "organisation id", const.MAX_ORGANISATION_ID_LENGTH, required=True
        )
        org_name = check_text(
            with_plain_spaces(organisation_name),
            "organisation name",
            const.MAX_ORGANISATION_NAME_LENGTH,
            required=True,
        )
        # Both are shown to clinicians and written into the certificate.
        if not is_shown_name(org_name):
            raise InvalidInput(
                f"organisation name has invisible or line-break characters, or no letter or "
                f"digit: {org_name!r}"
            )
        if not (org_id.isascii() and org_id.isprintable()):  # URA, AGB, NPI: plain ASCII
            raise InvalidInput(
                f"organisation id must be printable ASCII (letters, digits, - . and the like), "
                f"not {org_id!r}"
            )
        if join_address:
            invite.check_join_address(join_address)
        node = check_node_id(node_id) if node_id else node_id_for(org_id)
        if not 0 < ttl_s <= const.MAX_INVITE_TTL_S:
            raise InvalidInput(
                f"an invite is valid for 1 s to {const.MAX_INVITE_TTL_S // 3600} hours, "
                f"not {ttl_s} s"
            )
        if self._ca_cert is None:
            raise RuntimeError("this Membership holds no CA certificate: it cannot invite")
        now = self._clock.now()
        token = invite.new_token(
            join_address, pki.fingerprint(self._ca_cert), now, ttl_s, node_id=node
        )
        record = InviteRecord(
            secret_hash=invite.secret_hash(token.secret),
            node_id=node,
            organisation_id=org_id,
            organisation_name=org_name,
            created_at=now,
            expires_at=float(token.expires_at),
            organisation_category=organisation_category,
        )
        taken_by = await self._storage.add_invite(record, now)
        if taken_by == "certificate":
            raise InvalidInput(
                f"node id {node} already belongs to a joined node; revoke it first "
                "or give another --node-id"
            )
        if taken_by is not None and taken_by.startswith("category "):
            was = taken_by.removeprefix("category ")
            same = f"--category {was}" if was else "no --category"
            raise InvalidInput(
                f"node id {node} joined before {f'as a {was}' if was else 'with no category'}, "
                f"and peers' consents by kind follow it: invite it again with {same}, "
                "or give another --node-id"
            )
        if taken_by is not None and taken_by.startswith("organisation "):
            raise InvalidInput(
                f"node id {node} belonged to {taken_by}: a node id stays with its organisation "
                "(peers' records and audit logs name it); give another --node-id"
            )
        if taken_by is not None:
            raise InvalidInput(await self._held_by_invite(node, now))
        log.info(
            "invite for node %s of organisation %s valid until %s",
            node,
            org_id,
            _utc(record.expires_at),
        )
        return invite.encode(token)

    async def _held_by_invite(self, node: str, now: float) -> str:
        """Why an open invite for ``node`` stops a new one, and how to end it at once.

        Its token may be lost: waiting up to MAX_INVITE_TTL_S for it to
        expire should not be the only way to invite the node again.
        """
        pending = await self._storage.open_invite(node, now)
        if pending is None:  # it ended since add_invite looked
            return f"node id {node} had a pending invite that has just ended; try again"
        org = pending.organisation_id
        return (
            f"node id {node} already has a pending invite, of organisation {org}, open until "
            f"{_utc(pending.expires_at)}: `{revoke_command('REGISTRY_DB', org)}` closes it "
            f"at once (and revokes any certificate of {org}), so a new invite can be made; "
            "or give another --node-id"
        )

    async def join(self, secret: bytes, csr_der: bytes) -> JoinResult:
        """Admit the node the invite names; PermissionDenied/InvalidInput change nothing."""
        if self._ca_cert is None or self._ca_key is None or self._network_key is None:
            raise RuntimeError("this Membership holds no CA key: it cannot admit nodes")
        now = self._clock.now()
        secret_hash = invite.secret_hash(secret)
        record = self._usable(await self._storage.get_invite(secret_hash), now)
        try:
            csr = x509.load_der_x509_csr(csr_der)
        except ValueError:
            raise InvalidInput("the certificate request is not a DER PKCS#10 request") from None
        member = Member(
            record.node_id,
            record.organisation_id,
            record.organisation_name,
            record.organisation_category,
        )
        certificate = pki.issue_node_certificate(
            self._ca_key,
            self._ca_cert,
            csr,
            member.node_id,
            member.organisation_id,
            member.organisation_name,
            now=datetime.fromtimestamp(now, UTC),
            organisation_category=member.organisation_category,
        )
        public_key = csr.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)  # issue_node_certificate checked
        wrapped = keywrap.wrap_for(public_key, self._network_key, keywrap.NETWORK_KEY_CONTEXT)
        issued = CertificateRecord(
            serial=pki.identity(certificate).serial,
            node_id=member.node_id,
            organisation_id=member.organisation_id,
            issued_at=now,
            not_after=certificate.not_valid_after_utc.timestamp(),
        )
        if not await self._storage.redeem_invite(secret_hash, issued, now):
            # Another join took this invite between our check and now.
            self._usable(await self._storage.get_invite(secret_hash), now)
            raise PermissionDenied(UNKNOWN_INVITE)
        log.info(
            "node %s of organisation %s joined (certificate %s)",
            member.node_id,
            member.organisation_id,
            issued.serial,
        )
        return JoinResult(
            certificate_der=certificate.public_bytes(serialization.Encoding.DER),
            ca_certificate_der=self._ca_cert.public_bytes(serialization.Encoding.DER),
            wrapped_network_key=wrapped,
            member=member,
        )

    @staticmethod
    def _usable(record: InviteRecord | None, now: float) -> InviteRecord:
        if record is None:
            raise PermissionDenied(UNKNOWN_INVITE)
        if record.used_at is not None:
            raise PermissionDenied(f"this invite was already used at {_utc(record.used_at)}")
        if record.closed_at is not None:
            raise PermissionDenied(_withdrawn(record, record.closed_at))
        if now >= record.expires_at:
            raise PermissionDenied(
                f"this invite expired at {_utc(record.expires_at)}; ask the operator for a new one"
            )
        return record

    async def revoke(self, organisation_id: str) -> list[str]:
        """Revoke every certificate of the organisation; the serials revoked now.

        NotFound when the organisation never joined; an empty list when all
        its certificates were revoked already.
        """
        org_id = check_text(
            organisation_id, "organisation id", const.MAX_ORGANISATION_ID_LENGTH, required=True
        )
        known, revoked = await self._storage.revoke_organisation(org_id, self._clock.now())
        if not known:
            raise NotFound(f"organisation {org_id} has no certificates: it never joined")
        self._revoked |= {r.serial for r in revoked}
        for record in revoked:
            log.info(
                "revoked certificate %s of node %s (organisation %s)",
                record.serial,
                record.node_id,
                org_id,
            )
        return [r.serial for r in revoked]

    async def close_invites(self, organisation_id: str) -> int:
        """End the organisation's open invites (a leaked or mis-sent token); how many."""
        org_id = check_text(
            organisation_id, "organisation id", const.MAX_ORGANISATION_ID_LENGTH, required=True
        )
        closed = await self._storage.close_open_invites(org_id, self._clock.now())
        if closed:
            log.info("closed %d open invite(s) of organisation %s", closed, org_id)
        return closed

    async def revocations(self) -> list[RevocationRecord]:
        """Every revocation, oldest first (what nodes pull)."""
        return await self._storage.revocations()

    async def refresh_revocations(self) -> None:
        """Reload the revoked serials from storage (another process may have revoked).

        A union, never a replacement: revocations are permanent, and a reload
        that started before an in-process ``revoke`` must not undo it.
        """
        self._revoked |= {r.serial for r in await self._storage.revocations()}

    def is_revoked(self, identity: pki.CertificateIdentity) -> bool:
        """True when the certificate's serial is revoked (as of the last refresh)."""
        return identity.serial in self._revoked

    @property
    def revoked_serials(self) -> frozenset[str]:
        return self._revoked
