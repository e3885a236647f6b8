"""The Transmural registry: node directory, pseudonymised master patient index, membership.

- ``const``: every interval and limit the registry uses.
- ``index``: the domain (``NodeDirectory``, ``MasterPatientIndex``); no gRPC, no SQL.
- ``enrolment``: the membership domain (``Membership``: invites, joins,
  revocations); no gRPC, no SQL.
- ``store``: SQLite storage behind ``index.RegistryStorage`` and
  ``enrolment.MembershipStorage``.
- ``network``: the operator's network folder (CA, registry certificate, network key).
- ``service``: the thin ``transmural.v1.Registry`` and ``Enrolment`` servicers.
- ``server``: ``RegistryServer``, which builds the parts and runs them.
- ``operator``: invite and revoke beside a running registry (``transmural-admin``).
- ``cli``: the ``transmural-registry`` console script.
"""

import transmural  # noqa: F401  (first: it quiets grpc's TLS chatter before grpc loads)
