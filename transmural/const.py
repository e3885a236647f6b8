"""Limits of the wire protocol, shared by both servers and every client."""

#: Largest gRPC message either side accepts (grpc's own default is 4 MiB).
MAX_MESSAGE_BYTES = 4 * 1024 * 1024

#: Size of one stored document chunk (a row of ``document_chunks``).
DOCUMENT_CHUNK_BYTES = 64 * 1024

#: Most content bytes in one message of a fetch stream: four stored chunks
#: joined. Relaying a message costs about the same whatever its size, so
#: fewer, larger messages fetch faster; memory per fetch stays bounded by
#: this size, never the document's.
FETCH_PIECE_BYTES = 4 * DOCUMENT_CHUNK_BYTES

#: Most index entries in one Publish call; a node splits larger batches.
MAX_PUBLISH_BATCH = 10_000

#: Most pseudonyms in one Locate call.
MAX_LOCATE_BATCH = 1_000

#: Most calls one server runs at once; beyond it a call gets RESOURCE_EXHAUSTED.
#: Throughput on these machines peaks by ~8 in flight per core; this leaves
#: room for slow streams (document fetches) without unbounded queueing.
MAX_CONCURRENT_RPCS = 256

#: Most connections one server keeps open at once (idle ones included);
#: a network of a few thousand facilities each keeping one channel fits.
MAX_INCOMING_CONNECTIONS = 4096

#: A connection that has not finished its TLS handshake by then is dropped.
HANDSHAKE_TIMEOUT_MS = 10_000

#: A connection with no calls for this long is closed (a client reconnects
#: transparently on its next call).
MAX_CONNECTION_IDLE_MS = 10 * 60 * 1000
