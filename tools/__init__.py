"""Command-line tools: the clinician's and the operator's commands, devnet, the bench."""

import transmural  # noqa: F401  (first: it quiets grpc's TLS chatter before grpc loads)
