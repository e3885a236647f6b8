"""The one error hierarchy of Transmural.

Domain code raises these; the service boundary maps each to a gRPC status
(see ``GRPC_CODE_NAMES``) and the CLIs print the message and exit non-zero.
Anything else that escapes is a bug and goes out as INTERNAL without detail.

    TransmuralError                 base; message is safe to show a user
    ├── InvalidInput                bad input from the wire, a file or a CLI
    │   ├── InvalidIdentifier       identifier fails its system's rules
    │   └── InvalidBundle           a FHIR bundle cannot be ingested
    ├── NotFound                    no such node, patient or document
    ├── PermissionDenied            consent (or trust) says no
    ├── Unauthenticated             no, unknown or expired clinician token
    ├── Unavailable                 a dependency (registry, peer) is down
    │   └── TimedOut                  ... or did not answer before its deadline
    ├── ConfigError                 a configuration file or flag is wrong
    ├── AssertionRejected           a peer refuses a requester assertion, one code each:
    │   ├── InvalidAssertion          malformed payload               INVALID_ARGUMENT
    │   ├── AssertionSignatureInvalid not signed by the caller's key  UNAUTHENTICATED
    │   ├── AssertionIssuerMismatch   issuer or organisation not the  PERMISSION_DENIED
    │   │                             caller's certificate
    │   ├── AssertionWrongAudience    meant for another node          FAILED_PRECONDITION
    │   ├── AssertionExpired          outside its validity time       OUT_OF_RANGE
    │   └── AssertionReplayed         its nonce was already used      ALREADY_EXISTS
    ├── ReplayCacheFull             too many live nonces to check     RESOURCE_EXHAUSTED
    └── Overloaded                  over a caller's share of the work  RESOURCE_EXHAUSTED
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


class Unauthenticated(TransmuralError):
    """The caller could not be identified (no, unknown or expired token)."""

    grpc_code = "UNAUTHENTICATED"


class Unavailable(TransmuralError):
    grpc_code = "UNAVAILABLE"


class TimedOut(Unavailable):
    """Reached, but no answer before the deadline: worth backing off from, unlike a refusal."""


class Excluded(Unavailable):
    """This node itself is refused by the network (its certificate revoked): asking
    other facilities from memory is no way round it, unlike a registry that is down."""


class ConfigError(TransmuralError):
    grpc_code = "FAILED_PRECONDITION"


# --- requester assertions (transmural/assertion.py) ---
# Each refusal has its own status code so a caller (and its operator) can
# tell from the status alone which check failed.


class AssertionRejected(TransmuralError):
    """Base of every reason a peer refuses a signed requester assertion."""

    grpc_code = "PERMISSION_DENIED"


class InvalidAssertion(AssertionRejected):
    grpc_code = "INVALID_ARGUMENT"


class AssertionSignatureInvalid(AssertionRejected):
    grpc_code = "UNAUTHENTICATED"


class AssertionIssuerMismatch(AssertionRejected):
    grpc_code = "PERMISSION_DENIED"


class AssertionWrongAudience(AssertionRejected):
    grpc_code = "FAILED_PRECONDITION"


class AssertionExpired(AssertionRejected):
    grpc_code = "OUT_OF_RANGE"


class AssertionReplayed(AssertionRejected):
    grpc_code = "ALREADY_EXISTS"


class ReplayCacheFull(TransmuralError):
    """The replay cache holds only unexpired nonces: the caller should retry shortly."""

    grpc_code = "RESOURCE_EXHAUSTED"


class Overloaded(TransmuralError):
    """The caller already has its share of the work in progress: retry when some is done."""

    grpc_code = "RESOURCE_EXHAUSTED"
