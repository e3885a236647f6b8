"""Consent, decided by the data holder: the records and the rules.

A patient's consent at this node is a list of ``ConsentRecord``s; each is one
FHIR R4 ``Consent`` (``node.consent_fhir`` maps them one to one). Nothing here
touches the store or the wire: ``decide`` and ``locatable`` are pure
functions of the records, the network's ``ConsentPolicy`` and the time, so the
holder (may I answer?) and the publisher (may the registry list this
patient?) ask the same rules, and every rule is tested without a server.

Which consents count (``in_force``, ``applies_to``): status ``active``, and
``now`` inside the period (a date covers its whole day in UTC; the end is
inclusive, as in FHIR). A consent applies to a requester when it covers
every organisation (``all``), or names the requester's organisation id, or
the requester's organisation category. Specificity: organisation >
category > all.

How ``decide`` decides, per data category. Every document belongs to exactly
one data category (a document the holder cannot classify counts as
``notes``); a consent covers a category when its data is empty (all data) or
lists it. For each category the applicable consents that cover it at the
*highest specificity* decide, and among those a deny wins; when none covers
it, the network default does (opt-in: deny, opt-out: permit). Then
``allowed`` means some category is permitted, and ``denied_categories`` are
the others, whose documents the holder removes from the answer. Spelled out:

1. an applicable deny of all data at a specificity >= every applicable
   permit refuses everything ("a specific deny beats a broader permit");
2. otherwise an applicable permit allows (with none: only opt-out does);
3. a deny of some categories removes those, unless a more specific permit
   covers them; and a permit of some categories (under opt-in) allows only
   those: the per-category rule keeps such a permit from opening the rest.
4. break-the-glass: purpose ``emergency`` with a non-empty reason, where the
   policy allows it, gives everything and is always flagged (also when
   consent alone would have allowed it, so an auditor sees every emergency
   claim); the rule text keeps what consent alone said. Where the policy
   forbids it, the emergency purpose gets no extra rights.

A refusal carries nothing the holder could leak: ``denied_categories`` is
then every category, so even a holder that forgot ``allowed`` filters all.
``rule`` is for the audit log, never for the requester.
"""

from __future__ import annotations

import calendar
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from node.answers import Requester
from transmural.errors import InvalidInput
from transmural.names import is_shown_name, joins_a_word

Decision = Literal["permit", "deny"]
ActorKind = Literal["all", "organisation", "category"]

DECISIONS = ("permit", "deny")
ACTOR_KINDS = ("all", "organisation", "category")
#: Kinds of facility a consent can name (also in node certificates: transmural.pki).
ORGANISATION_CATEGORIES = ("hospital", "gp", "pharmacy", "nursing-home")
#: Kinds of data a consent can name; every document is in exactly one.
DATA_CATEGORIES = (
    "medication", "lab-results", "problems", "allergies", "imaging", "mental-health", "notes",
    "encounters",
)  # fmt: skip
ALL_DATA = frozenset(DATA_CATEGORIES)
RECORDED_VIA = ("desk", "portal")
STATUSES = ("active", "withdrawn")
EMERGENCY_PURPOSE = "emergency"
MAX_ORGANISATION_ID_LENGTH = 64
MAX_RECORDED_BY_LENGTH = 200

_LEVEL = {"all": 1, "category": 2, "organisation": 3}
_CONSENT_ID = re.compile(r"c-[0-9a-f]{12}")
_DATE = re.compile(r"(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?")
_DATETIME = re.compile(r"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?(Z|[+-]\d{2}:\d{2})")
#: Control characters (C0, DEL, C1) and the invisible ones that can make a name read as
#: another: zero-width, bidirectional overrides and isolates, line separators, BOM.
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")


def new_consent_id() -> str:
    """``c-`` and 12 random hex digits: unguessable, short enough to type."""
    return "c-" + secrets.token_hex(6)


def is_consent_id(text: str) -> bool:
    return _CONSENT_ID.fullmatch(text) is not None


@dataclass(frozen=True, slots=True)
class ConsentRecord:
    """One consent of one patient at this node; validated when made.

    ``data`` empty means all data. ``actor`` is an organisation id (as the
    network's certificates spell it) or a category code, and empty for
    ``all``. Dates are FHIR dates or dateTimes with a zone.
    """

    consent_id: str
    patient_key: int
    decision: Decision
    actor_kind: ActorKind
    actor: str
    data: frozenset[str]
    period_start: str
    period_end: str | None
    recorded_by: str
    recorded_via: Literal["desk", "portal"]
    recorded_at: str
    status: Literal["active", "withdrawn"] = "active"
    withdrawn_at: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", frozenset(self.data))
        problem = _problem(self)
        if problem:
            raise InvalidInput(f"consent {self.consent_id}: {problem}")


_ORGANISATION_ID = re.compile(rf"[A-Za-z0-9][A-Za-z0-9:._-]{{0,{MAX_ORGANISATION_ID_LENGTH - 1}}}")


def _problem(record: ConsentRecord) -> str:
    """What makes ``record`` invalid, or ""."""
    if not is_consent_id(record.consent_id):
        return "a consent id is 'c-' and 12 lowercase hex digits"
    choices = (
        ("decision", record.decision, DECISIONS),
        ("whom it covers", record.actor_kind, ACTOR_KINDS),
        ("recorded via", record.recorded_via, RECORDED_VIA),
        ("status", record.status, STATUSES),
    )
    for name, value, allowed in choices:
        if value not in allowed:
            return f"{name} must be one of {', '.join(allowed)}, not {value!r}"
    if record.actor_kind == "all" and record.actor:
        return "a consent for all organisations names no organisation or category"
    if record.actor_kind == "category" and record.actor not in ORGANISATION_CATEGORIES:
        return f"organisation category must be one of {', '.join(ORGANISATION_CATEGORIES)}"
    if record.actor_kind == "organisation" and not _ORGANISATION_ID.fullmatch(record.actor):
        # As certificates spell it (e.g. URA-90000001): a look-alike never matches.
        return (
            f"organisation id must be 1 to {MAX_ORGANISATION_ID_LENGTH} characters of "
            "A-Z, 0-9 and : . _ -, starting with a letter or digit, as the network spells it"
        )
    unknown = sorted(record.data - ALL_DATA)
    if unknown:
        return f"unknown data categories {', '.join(unknown)}; use {', '.join(DATA_CATEGORIES)}"
    if not _is_text(record.recorded_by, MAX_RECORDED_BY_LENGTH, spaces=True):
        return f"recorded by must be 1 to {MAX_RECORDED_BY_LENGTH} printable characters"
    dates = [("period start", record.period_start), ("recorded at", record.recorded_at)]
    dates += [("period end", record.period_end)] if record.period_end is not None else []
    dates += [("withdrawn at", record.withdrawn_at)] if record.withdrawn_at is not None else []
    for name, text in dates:
        if not is_fhir_datetime(text):
            return f"{name} {text!r} is not a date (YYYY-MM-DD) or a date-time with a zone"
    if record.period_end is not None and span(record.period_end)[1] < span(record.period_start)[0]:
        return "the period ends before it starts"
    if (record.status == "withdrawn") != (record.withdrawn_at is not None):
        return "a withdrawn consent has a withdrawal time, an active one none"
    return ""


def check_recorded_by(text: str) -> str:
    """Who recorded or withdrew a consent, as the audit log names them; InvalidInput if unfit."""
    if not _is_text(text, MAX_RECORDED_BY_LENGTH, spaces=True) or not is_shown_name(text):
        raise InvalidInput(
            f"recorded by must be 1 to {MAX_RECORDED_BY_LENGTH} printable characters, not {text!r}"
        )
    return text


def _is_text(text: object, limit: int, *, spaces: bool) -> bool:
    return (
        isinstance(text, str)
        and 0 < len(text) <= limit
        and text == text.strip()
        and not any(_UNPRINTABLE.match(c) and not joins_a_word(text, i) for i, c in enumerate(text))
        and (spaces or " " not in text)
    )


@dataclass(frozen=True, slots=True)
class ConsentPolicy:
    """The network's consent settings (node config ``consent_default``, ``break_the_glass``)."""

    default: Literal["opt-in", "opt-out"] = "opt-in"
    break_the_glass: bool = False

    def __post_init__(self) -> None:
        if self.default not in ("opt-in", "opt-out"):
            raise InvalidInput(f"consent default must be opt-in or opt-out, not {self.default!r}")


@dataclass(frozen=True, slots=True)
class ConsentDecision:
    """What the holder may give one requester now, and why (for the audit log)."""

    allowed: bool
    denied_categories: frozenset[str]
    rule: str
    break_the_glass: bool = False

    def shares(self, category: str) -> bool:
        """Whether documents of ``category`` go into the answer."""
        return self.allowed and category not in self.denied_categories


# --- time ---


def is_fhir_datetime(text: object) -> bool:
    """A FHIR date (YYYY, YYYY-MM, YYYY-MM-DD) or dateTime with seconds and a zone."""
    if not isinstance(text, str):
        return False
    try:
        span(text)
    except ValueError:
        return False
    return True


def span(text: str) -> tuple[datetime, datetime]:
    """First and last instant a FHIR date or dateTime covers; ValueError if it is neither.

    A partial date covers all of its days, in UTC (a Dutch "until 1 March"
    thus ends at 01:00 local time on 2 March: an hour, not a day, off).
    """
    match = _DATE.fullmatch(text)
    if match:
        year, month, day = match.group(1), match.group(2), match.group(3)
        if day:
            first = datetime(int(year), int(month), int(day), tzinfo=UTC)
            return first, first + timedelta(days=1, microseconds=-1)
        if month:
            first = datetime(int(year), int(month), 1, tzinfo=UTC)
            days = calendar.monthrange(first.year, first.month)[1]
            return first, first + timedelta(days=days, microseconds=-1)
        first = datetime(int(year), 1, 1, tzinfo=UTC)
        return first, first.replace(year=first.year + 1) - timedelta(microseconds=1)
    match = _DATETIME.fullmatch(text)
    if not match:
        raise ValueError(f"{text!r} is not a FHIR date or dateTime")
    whole, fraction, zone = match.groups()
    micro = f".{fraction[:6]}" if fraction else ""
    instant = datetime.fromisoformat(whole + micro + ("+00:00" if zone == "Z" else zone))
    return instant, instant


def as_utc(now: datetime | float) -> datetime:
    """``now`` as an aware datetime: pass ``clock.now()`` or a datetime."""
    if isinstance(now, datetime):
        if now.tzinfo is None:
            raise ValueError("now must carry a time zone")
        return now
    return datetime.fromtimestamp(now, UTC)


def in_force(record: ConsentRecord, now: datetime | float) -> bool:
    """Active, and ``now`` inside its period (both ends inclusive)."""
    moment = as_utc(now)
    if record.status != "active" or moment < span(record.period_start)[0]:
        return False
    return record.period_end is None or moment <= span(record.period_end)[1]


def covering(new: ConsentRecord, existing: Iterable[ConsentRecord]) -> ConsentRecord | None:
    """An active consent saying what ``new`` says, from no later and to the same end.

    Recording ``new`` beside it would change no decision, and the patient's
    list would show the same consent twice.
    """
    said = (new.decision, new.actor_kind, new.actor, new.data, new.period_end)
    for record in existing:
        if (
            record.status == "active"
            and (record.decision, record.actor_kind, record.actor, record.data, record.period_end)
            == said
            and span(record.period_start)[0] <= span(new.period_start)[0]
        ):
            return record
    return None


def applies_to(record: ConsentRecord, organisation_id: str, organisation_category: str) -> bool:
    """Whether the consent is about a requester from this organisation."""
    if record.actor_kind == "all":
        return True
    if record.actor_kind == "organisation":
        return bool(organisation_id) and record.actor == organisation_id
    return bool(organisation_category) and record.actor == organisation_category


# --- the rules ---


def describe(record: ConsentRecord) -> str:
    """``consent c-123: deny organisation URA-2 all data``: how the audit names a consent."""
    whom = {"all": "all organisations", "organisation": "organisation", "category": "category"}
    actor = f" {record.actor}" if record.actor else ""
    what = ", ".join(c for c in DATA_CATEGORIES if c in record.data) or "all data"
    return f"consent {record.consent_id}: {record.decision} {whom[record.actor_kind]}{actor} {what}"


def decide(
    consents: Iterable[ConsentRecord],
    requester_organisation_id: str,
    requester_organisation_category: str,
    purpose_of_use: str,
    break_the_glass_reason: str,
    policy: ConsentPolicy,
    now: datetime | float,
) -> ConsentDecision:
    """Whether (and which data) this node may share with the requester now (module doc)."""
    by_consent = _decide_by_consent(
        consents, requester_organisation_id, requester_organisation_category, policy, now
    )
    emergency = purpose_of_use == EMERGENCY_PURPOSE
    if emergency and break_the_glass_reason.strip() and policy.break_the_glass:
        return ConsentDecision(
            True, frozenset(), f"break-the-glass (consent alone: {by_consent.rule})", True
        )
    if emergency and not by_consent.allowed:
        if not policy.break_the_glass:
            why = "the network does not allow break-the-glass"
        else:
            why = "emergency without a reason is no break-the-glass"
        return ConsentDecision(False, ALL_DATA, f"{by_consent.rule} ({why})")
    return by_consent


def decide_for(
    consents: Iterable[ConsentRecord],
    requester: Requester,
    policy: ConsentPolicy,
    now: datetime | float,
) -> ConsentDecision:
    """``decide`` for a requester as the holder receives one."""
    return decide(
        consents, requester.organisation_id, requester.organisation_category,
        requester.purpose_of_use, requester.reason, policy, now,
    )  # fmt: skip


def _decide_by_consent(
    consents: Iterable[ConsentRecord],
    organisation_id: str,
    organisation_category: str,
    policy: ConsentPolicy,
    now: datetime | float,
) -> ConsentDecision:
    """The per-category rule of the module doc, without break-the-glass."""
    moment = as_utc(now)
    applicable = [
        c
        for c in consents
        if in_force(c, moment) and applies_to(c, organisation_id, organisation_category)
    ]
    permitted: set[str] = set()
    deciders: dict[str, ConsentRecord] = {}
    by_default: list[str] = []
    for category in DATA_CATEGORIES:
        covering = [c for c in applicable if not c.data or category in c.data]
        if not covering:
            by_default.append(category)
            if policy.default == "opt-out":
                permitted.add(category)
            continue
        top = max(_LEVEL[c.actor_kind] for c in covering)
        at_top = [c for c in covering if _LEVEL[c.actor_kind] == top]
        denies = [c for c in at_top if c.decision == "deny"]
        for record in denies or at_top:
            deciders[record.consent_id] = record
        if not denies:
            permitted.add(category)
    parts = [
        describe(r)
        for r in sorted(
            deciders.values(),
            key=lambda r: (-_LEVEL[r.actor_kind], r.decision != "deny", r.consent_id),
        )
    ]
    if len(by_default) == len(DATA_CATEGORIES):
        parts.append(
            "no applicable consent (opt-out)"
            if policy.default == "opt-out"
            else "no applicable permit (opt-in)"
        )
    elif by_default:
        parts.append(f"network default {policy.default} for {', '.join(by_default)}")
    rule = "; ".join(parts)
    if not permitted:
        return ConsentDecision(False, ALL_DATA, rule)
    return ConsentDecision(True, ALL_DATA - permitted, rule)


def locatable(
    consents: Iterable[ConsentRecord], policy: ConsentPolicy, now: datetime | float
) -> bool:
    """Whether some organisation could be allowed something now: may the registry list them?

    Exact, not a heuristic: a requester's answer depends only on whether its
    organisation id is one a consent names and on its category, so asking
    ``decide`` for every named id, and for one unnamed id, in every category
    (and none) covers every organisation there can be. Break-the-glass is
    left out: a patient who lets no one see their record is not listed, so
    an emergency search cannot find them here either (the index never shows
    a relationship the patient did not agree to).
    """
    records = [c for c in consents if in_force(c, now)]
    named = {c.actor for c in records if c.actor_kind == "organisation"}
    unnamed = "\x00unnamed"  # no real id: ids are printable
    categories = [*ORGANISATION_CATEGORIES, ""]
    return any(
        _decide_by_consent(records, organisation, category, policy, now).allowed
        for organisation in [*sorted(named), unnamed]
        for category in categories
    )
