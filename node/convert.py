"""Protobuf <-> domain conversions for the node's service and client adapters.

Only adapters import this module (and the generated stubs); domain code
sees dataclasses from ``node.answers`` and ``node.records``.
"""

from __future__ import annotations

from node.answers import Facility, Status
from node.clinical_items import ClinicalItem
from node.records import DocumentRecord
from transmural.v1 import common_pb2

_STATUS_TO_PROTO = {
    Status.OK: common_pb2.FACILITY_STATUS_OK,
    Status.NO_RECORD: common_pb2.FACILITY_STATUS_NO_RECORD,
    Status.CONSENT_DENIED: common_pb2.FACILITY_STATUS_CONSENT_DENIED,
    Status.TIMEOUT: common_pb2.FACILITY_STATUS_TIMEOUT,
    Status.UNREACHABLE: common_pb2.FACILITY_STATUS_UNREACHABLE,
    Status.ERROR: common_pb2.FACILITY_STATUS_ERROR,
}
_STATUS_FROM_PROTO = {v: k for k, v in _STATUS_TO_PROTO.items()}


def status_to_proto(status: Status) -> common_pb2.FacilityStatus:
    return _STATUS_TO_PROTO[status]


def status_from_proto(value: common_pb2.FacilityStatus) -> Status | None:
    """The domain status, or None for a value this version does not know."""
    return _STATUS_FROM_PROTO.get(value)


def facility_to_proto(facility: Facility) -> common_pb2.NodeInfo:
    return common_pb2.NodeInfo(
        node_id=facility.node_id,
        organisation_name=facility.organisation_name,
        organisation_id=facility.organisation_id,
        endpoint=facility.endpoint,
    )


def facility_from_proto(message: common_pb2.NodeInfo) -> Facility:
    return Facility(
        node_id=message.node_id,
        organisation_name=message.organisation_name,
        organisation_id=message.organisation_id,
        endpoint=message.endpoint,
    )


def document_to_proto(document: DocumentRecord) -> common_pb2.DocumentMetadata:
    return common_pb2.DocumentMetadata(
        document_id=document.document_id,
        title=document.title,
        type_system=document.type_system,
        type_code=document.type_code,
        type_display=document.type_display,
        content_type=document.content_type,
        size=document.size,
        sha256=document.sha256,
        created=document.created,
        author_organisation=document.author_organisation,
    )


def document_from_proto(message: common_pb2.DocumentMetadata) -> DocumentRecord:
    """A peer's document metadata; patient_key 0 because it is not ours."""
    return DocumentRecord(
        document_id=message.document_id,
        patient_key=0,
        title=message.title,
        type_system=message.type_system,
        type_code=message.type_code,
        type_display=message.type_display,
        content_type=message.content_type,
        size=message.size,
        sha256=message.sha256,
        created=message.created,
        author_organisation=message.author_organisation,
    )


def item_to_proto(item: ClinicalItem) -> common_pb2.ClinicalItem:
    return common_pb2.ClinicalItem(
        section=item.section,
        code_system=item.code_system,
        code=item.code,
        display=item.display,
        status=item.status,
        date=item.date,
        value=item.value,
        unit=item.unit,
        resource_id=item.resource_id,
        resource_json=item.resource_json,
    )


def item_from_proto(message: common_pb2.ClinicalItem) -> ClinicalItem:
    return ClinicalItem(
        section=message.section,
        code_system=message.code_system,
        code=message.code,
        display=message.display,
        status=message.status,
        date=message.date,
        value=message.value,
        unit=message.unit,
        resource_id=message.resource_id,
        resource_json=message.resource_json,
    )
