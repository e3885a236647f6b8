"""The one error hierarchy of Transmural.

Domain code raises these; the service boundary maps each to a gRPC status
(see ``GRPC_CODE_NAMES``) and the CLIs print the message and exit non-zero.
Anything else that escapes is a bug and goes out as INTERNAL without detail.

    TransmuralError                 base; message is safe to show a user
    ├── InvalidInput                bad input from the wire, a file or a CLI
    │   ├── InvalidIdentifier       identifier fails its system's rules
    │   └── InvalidBundle           a FHIR bundle cannot be ingested
    ├── NotFound                    no such node, patient or document
    ├── PermissionDenied            consent (or later: trust) says no
    ├── Unavailable                 a dependency (registry, peer) is down
    └── ConfigError                 a configuration file or flag is wrong
"""

from __future__ import annotations


class TransmuralError(Exception):
    """Base of every error whose message may be shown to the user."""

    #: Name of the grpc.StatusCode the service boundary maps this to.
    grpc_code = "INTERNAL"


class InvalidInput(TransmuralError):
    grpc_code = "INVALID_ARGUMENT"


class InvalidIdentifier(InvalidInput):
    pass


class InvalidBundle(InvalidInput):
    pass


class NotFound(TransmuralError):
    grpc_code = "NOT_FOUND"


class PermissionDenied(TransmuralError):
    grpc_code = "PERMISSION_DENIED"


class Unavailable(TransmuralError):
    grpc_code = "UNAVAILABLE"


class ConfigError(TransmuralError):
    grpc_code = "FAILED_PRECONDITION"
