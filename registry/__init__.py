"""The Transmural registry: node directory and pseudonymised master patient index.

- ``const``: every interval and limit the registry uses.
- ``index``: the domain (``NodeDirectory``, ``MasterPatientIndex``); no gRPC, no SQL.
- ``store``: SQLite storage behind ``index.RegistryStorage``.
- ``service``: the thin ``transmural.v1.Registry`` servicer.
- ``server``: ``RegistryServer``, which builds the parts and runs them.
- ``cli``: the ``transmural-registry`` console script.
"""
