"""Every interval, deadline and limit of the node, in one place (tests shrink them)."""

#: How long the gateway waits for one facility's answer, unless asked otherwise.
PEER_DEADLINE_S = 3.0
#: Longest per-facility deadline a clinician may ask for.
MAX_PEER_DEADLINE_S = 30.0
#: Deadline of a registry call (locate, publish, register).
REGISTRY_DEADLINE_S = 3.0
#: How long the gateway may answer from a patient's last known holders while
#: the registry is unreachable (results then say they may be incomplete),
#: and how many patients it remembers.
LOCATION_CACHE_S = 600.0
LOCATION_CACHE_SIZE = 10_000
#: Searches, reports and fetches one clinician may have running at a node at once.
MAX_REQUESTS_PER_CLINICIAN = 16
#: Calls one facility may have running at another's peer port at once: half
#: of MAX_CONCURRENT_RPCS, so that no one facility can take every slot.
MAX_CALLS_PER_FACILITY = 128
#: Deadline of a whole document fetch through the gateway.
FETCH_DEADLINE_S = 120.0

#: How often a node pulls the registry's list of revoked certificates.
REVOCATION_POLL_S = 5.0
#: Warn this long before the node's own certificate expires, and this often.
CERTIFICATE_WARNING_DAYS = 30
CERTIFICATE_CHECK_INTERVAL_S = 12 * 3600.0
#: Lifetime of a requester assertion this node signs (peers accept up to 300 s).
ASSERTION_LIFETIME_S = 120

#: How often a node re-registers its directory entry with the registry.
REGISTER_INTERVAL_S = 30.0
#: How often the publisher re-checks patients whose consents start or end in time.
LISTING_SWEEP_S = 30.0
#: How often the publisher looks for new index changes when idle.
PUBLISH_POLL_S = 0.5
#: First and longest wait before retrying a registry that did not answer.
PUBLISH_RETRY_MIN_S = 0.5
PUBLISH_RETRY_MAX_S = 15.0

#: Seconds a stopping server gives running calls to finish.
STOP_GRACE_S = 2.0
