"""What every Transmural deployable shares: the wire protocol and its rules.

- ``transmural.v1``: gRPC stubs generated from ``proto/`` (never edited).
- ``identifiers``: canonical forms of national patient identifiers.
- ``pseudonym``: the network pseudonym over a canonical identifier.
- ``transport``: channel and server credentials, in one place.
- ``errors``: the error hierarchy both servers map onto gRPC statuses.
- ``clock``: the injectable clock.
"""

import os as _os

# grpc's core library writes every refused TLS handshake to stderr at INFO;
# our servers log refusals themselves, once, in their own words.
_os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
