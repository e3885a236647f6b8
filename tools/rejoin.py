"""Join again in place: a revoked facility comes back with its settings and records.

After ``transmural-admin revoke`` (a lost key, a stolen laptop) the node's
certificate is refused everywhere, but its database, its audit log and its
``node.toml`` settings (ports, national system, consent policy) are still
the facility's. ``rejoin`` uses a new invite for the same node id to get a
new key and certificate and puts them where ``node.toml`` says, keeping
everything else. It refuses, before the invite is used up, an invite for
another node or another network, and a node that is still running; after
the Join it replaces nothing unless the registry named the same node and
organisation and sent the same network key. Every patient is queued to be
listed again (the registry dropped the revoked node's index entries), the
re-join is the next record in the node's own audit log, and then the new key
and certificate are staged and swapped in (``pki.complete_renewal``; a swap
cut off half-way is finished when the node starts).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from node.audit import AuditLog
from node.config import NodeConfig
from node.store import NodeStore
from tools.admin_audit import join_record
from tools.join import Enrolment, decode_unexpired, enrol
from transmural import pki
from transmural.clock import Clock, SystemClock
from transmural.errors import ConfigError
from transmural.pseudonym import read_network_key
from transmural.server_lock import ServerLock


async def rejoin(
    token_text: str,
    config: NodeConfig,
    interfaces_for_discovery: list[str] | None = None,
    clock: Clock | None = None,
) -> Enrolment:
    """Replace the node's key and certificate with ones from a new invite; keep the rest."""
    if config.certificate is None or config.private_key is None or config.ca_certificate is None:
        raise ConfigError("an --insecure-dev node has no certificate to renew")
    token = decode_unexpired(token_text, clock)
    _check_invite(token.node_id, token.ca_fingerprint, config, config.ca_certificate)
    lock = ServerLock.beside(config.database, "node")  # held: the node must not start meanwhile
    try:
        store = await NodeStore.open(config.database, existing=True, node=config.identity)
        try:
            done = await enrol(token, config.private_key.parent, interfaces_for_discovery)
            _check_same_node(done, config)
            await asyncio.to_thread(_stage, done, config)
            # Every patient queued to be listed again (the registry dropped the revoked
            # node's entries), and the re-join recorded; cut off from here on, the node
            # finishes the swap when it starts, and queues and records it itself.
            await store.request_full_relisting()
            await _audit_rejoin(store, done, clock or SystemClock())
            await asyncio.to_thread(pki.complete_renewal, config.private_key, config.certificate)
        finally:
            await store.close()
    finally:
        lock.release()
    return done


def _check_invite(invited: str, ca_fingerprint: str, config: NodeConfig, ca_file: Path) -> None:
    """Refuse an invite that cannot renew this node, while it is still unused."""
    if invited and invited != config.node_id:
        raise ConfigError(
            f"this invite is for node {invited}, not {config.node_id}; it is still unused: "
            f"ask the operator for an invite with --node-id {config.node_id}"
        )
    if pki.fingerprint(pki.read_certificate(ca_file)) != ca_fingerprint:
        raise ConfigError(
            f"this invite is for another network than node {config.node_id}'s (its CA "
            f"{ca_file} does not match); it is still unused"
        )


def _check_same_node(done: Enrolment, config: NodeConfig) -> None:
    """After the Join: the registry made this node again, in this network, or nothing changes."""
    node = done.node
    if (node.node_id, node.organisation_id) != config.identity:
        raise ConfigError(
            f"the invite was for node {node.node_id} of {node.organisation_id}, not "
            f"{config.node_id} of {config.organisation_id}; nothing was replaced, but the "
            f"invite is used up: the operator revokes {node.organisation_id} and invites "
            f"again with --node-id {config.node_id} --org-id {config.organisation_id}"
        )
    if done.network_key != read_network_key(config.network_key_file):
        raise ConfigError(
            f"the registry sent another network key than {config.network_key_file}: "
            "nothing was replaced (pseudonyms made with it would not match this node's)"
        )


def _stage(done: Enrolment, config: NodeConfig) -> None:
    """The new key and certificate beside the old pair (``pki.stage_renewal``)."""
    assert config.private_key is not None and config.certificate is not None
    try:
        pki.stage_renewal(config.private_key, config.certificate, done.key, done.certificate)
    except OSError as error:
        raise ConfigError(
            f"cannot write the new key and certificate beside {config.private_key}: "
            f"{error.strerror}; the invite is used up and its certificate lost: the operator "
            "revokes the organisation again and makes a new invite"
        ) from None


async def _audit_rejoin(store: NodeStore, done: Enrolment, clock: Clock) -> None:
    node, serial = done.node, pki.identity(done.certificate).serial
    record = join_record(node.node_id, node.organisation_id, node.registry_endpoint,
                         "re-joined", f": new key and certificate (serial {serial})")  # fmt: skip
    await AuditLog(store.database, clock).append(record)
