"""The Transmural node: a facility's store, consent, audit, peer and gateway servers."""

import transmural  # noqa: F401  (first: it quiets grpc's TLS chatter before grpc loads)
