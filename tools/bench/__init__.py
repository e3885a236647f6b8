"""``make bench``: measured figures, each beside a baseline taken in the same run.

``python -m tools.bench.run`` runs every benchmark (bounded in time) and
writes ``BENCHMARKS.md``. Servers run in a child process so client and
server each get a core; everything is on 127.0.0.1 over mutual TLS with a
test PKI minted for the run.
"""

import os

# grpc core logs every refused handshake (the registry's own self-check makes some) at INFO.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
