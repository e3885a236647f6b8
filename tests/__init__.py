"""The tests; ``make test`` runs them."""

import transmural  # noqa: F401  (first: it quiets grpc's TLS chatter before grpc loads)
