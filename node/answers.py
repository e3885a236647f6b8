"""The words of a search or report: who asks, which facility, what it answered.

Plain data shared by the holder (answering side) and the gateway (asking
side); the service layer converts these to and from protobuf.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from node.clinical_items import ClinicalItem
from node.records import DocumentRecord
from transmural.errors import InvalidInput

#: A document id longer than this is refused on both sides of a fetch.
MAX_DOCUMENT_ID_LENGTH = 256


def check_document_id(document_id: str) -> str:
    """The id, if it has a length a document id can have; else InvalidInput."""
    if not document_id or len(document_id) > MAX_DOCUMENT_ID_LENGTH:
        raise InvalidInput(f"a document id is 1 to {MAX_DOCUMENT_ID_LENGTH} characters")
    return document_id


class Status(StrEnum):
    """A facility's answer to one search, as the clinician sees it."""

    OK = "ok"
    NO_RECORD = "no-record"
    CONSENT_DENIED = "consent-denied"
    TIMEOUT = "timeout"
    UNREACHABLE = "unreachable"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class Requester:
    """The clinician on whose behalf a node asks, and why."""

    clinician_id: str
    display_name: str
    role: str
    organisation_id: str
    purpose_of_use: str
    reason: str = ""  # break-the-glass: why, with purpose "emergency"
    on_behalf_of: str = ""  # the responsible user, when the clinician acts for another
    organisation_category: str = ""  # hospital, gp, ...: from the caller's certificate


@dataclass(frozen=True, slots=True)
class Facility:
    """A node as the registry's directory lists it."""

    node_id: str
    organisation_name: str
    organisation_id: str
    endpoint: str


@dataclass(frozen=True, slots=True)
class HolderAnswer:
    """What the holder decided: OK with documents (or report items), or a status with none."""

    status: Status
    documents: list[DocumentRecord] = field(default_factory=list)
    items: list[ClinicalItem] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class FacilityAnswer:
    """One facility's result in a search, as streamed to the clinician."""

    facility: Facility
    status: Status
    elapsed_ms: int
    message: str = ""
    documents: list[DocumentRecord] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class FacilityItemsAnswer:
    """One facility's answer in a live report: its entries instead of documents."""

    facility: Facility
    status: Status
    elapsed_ms: int
    message: str = ""
    items: list[ClinicalItem] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Located:
    """The holders the registry listed; opens every search stream."""

    holders: list[Facility]
    correlation_id: str
    #: Why the list may be incomplete (registry unreachable); "" when it is not.
    incomplete: str = ""
