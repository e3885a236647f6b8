"""Limits of the wire protocol, shared by both servers and every client."""

#: Largest gRPC message either side accepts (grpc's own default is 4 MiB).
MAX_MESSAGE_BYTES = 4 * 1024 * 1024

#: Size of one document chunk in a fetch stream.
DOCUMENT_CHUNK_BYTES = 64 * 1024

#: Most index entries in one Publish call; a node splits larger batches.
MAX_PUBLISH_BATCH = 10_000

#: Most pseudonyms in one Locate call.
MAX_LOCATE_BATCH = 1_000

#: Most calls one server runs at once; beyond it a call gets RESOURCE_EXHAUSTED.
#: Throughput on these machines peaks by ~8 in flight per core; this leaves
#: room for slow streams (document fetches) without unbounded queueing.
MAX_CONCURRENT_RPCS = 256
