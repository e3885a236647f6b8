"""Every interval and limit the registry uses, in one place so tests can shrink them.

The wire limits shared with nodes (batch sizes, message size) live in
``transmural.const``; what is here is the registry's own.
"""

#: Where the server listens unless told otherwise (port 0 picks a free port).
DEFAULT_LISTEN = "127.0.0.1:0"

#: Seconds in-flight calls get to finish when the server stops.
SHUTDOWN_GRACE_SECONDS = 1.0

#: Node ids are short, lowercase and safe in logs, paths and DNS labels.
NODE_ID_PATTERN = r"[a-z0-9-]{1,64}"

#: Longest organisation name (characters) in the node directory.
MAX_ORGANISATION_NAME_LENGTH = 200

#: Longest organisation id (URA/AGB number and the like).
MAX_ORGANISATION_ID_LENGTH = 64

#: Longest host name in an endpoint (the DNS limit).
MAX_ENDPOINT_HOST_LENGTH = 253

#: Most pseudonyms bound into one ``IN (...)`` locate query. SQLite 3.32+
#: accepts 32,766 variables, so one Locate batch is one round trip.
LOCATE_QUERY_CHUNK = 1_000

#: Milliseconds SQLite waits for a lock held by another process before
#: giving up (only an operator's sqlite3 shell should ever hold one).
SQLITE_BUSY_TIMEOUT_MS = 5_000

#: Where the join port listens unless told otherwise (port 0 picks a free port).
DEFAULT_JOIN_LISTEN = "127.0.0.1:0"

#: Seconds between reloads of the revoked-serial set from the database:
#: ``transmural-admin revoke`` writes it from another process, and the
#: registry refuses a revoked node within this interval.
REVOCATION_REFRESH_S = 1.0

#: Default lifetime of an invite token (seconds).
DEFAULT_INVITE_TTL_S = 24 * 3600

#: Longest lifetime an operator may give an invite (seconds): 30 days.
MAX_INVITE_TTL_S = 30 * 24 * 3600

#: Seconds the start-up self-check waits for each probe of the mutual-TLS port.
SELF_CHECK_TIMEOUT_S = 5.0

#: Warn at start-up when the registry's or the CA's certificate expires within this (s).
CERTIFICATE_WARNING_S = 30 * 24 * 3600

#: SQLite page cache of the registry: the index's B-tree of 10M entries is
#: ~700 MB; keeping its upper levels and hot pages cached keeps a lookup at
#: 10M entries close to one at 1M.
SQLITE_CACHE_MIB = 64

#: Calls one node may have running at the registry at once: half of
#: ``transmural.const.MAX_CONCURRENT_RPCS``, so that no one node (a gateway in
#: a loop, a hostile member) can take every slot from the others.
MAX_CALLS_PER_NODE = 128
