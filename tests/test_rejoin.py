"""A revoked facility comes back (``transmural-admin rejoin``): new key, same records.

Real registry and nodes on loopback with mutual TLS; the operator's revoke
and invite are the registry's own code.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from node.audit import AuditLog
from node.config import NodeConfig
from node.server import NodeServer
from registry import operator
from tests.conftest import NetworkFactory, RunningNetwork, collect
from tests.test_search import bsn_of
from tools.rejoin import rejoin
from transmural import invite, pki
from transmural.clock import SystemClock
from transmural.errors import ConfigError


async def invite_again(net: RunningNetwork, node_id: str, org_id: str = "URA-90000002") -> str:
    assert net.registry.membership is not None and net.registry.join_address
    return await net.registry.membership.create_invite(
        org_id, "Facility 2", node_id, net.registry.join_address
    )


def serial(config: NodeConfig) -> str:
    assert config.certificate is not None
    return pki.identity(pki.read_certificate(config.certificate)).serial


def audit_reasons(database: Path) -> list[str]:
    with sqlite3.connect(database) as db:
        return [r[0] for r in db.execute("SELECT outcome_reason FROM audit_log ORDER BY seq")]


async def test_a_revoked_node_rejoins_with_its_records_settings_and_audit_log(
    network: NetworkFactory, synthetic_bundles: Path
) -> None:
    net = await network(n=2)
    plan = await net.load(synthetic_bundles)
    await net.consent_all()
    held = next(p for p in sorted(plan.patients) if 1 in plan.patients[p].nodes)  # node-2
    second = net.nodes[1]
    config = second.config
    revoked_serial = serial(config)
    await operator.revoke(net.root / "registry.db", config.organisation_id)
    assert net.registry.membership is not None
    await net.registry.membership.refresh_revocations()

    token = await invite_again(net, "node-2")
    with pytest.raises(ConfigError, match="this node is already running"):
        await rejoin(token, config)  # refused before the invite is used: it works below
    await second.stop(0)
    with pytest.raises(ConfigError, match="this invite is for node node-3, not node-2"):
        await rejoin(await invite_again(net, "node-3", "URA-3"), config)
    before = audit_reasons(config.database)

    done = await rejoin(token, config)

    assert done.node.node_id == "node-2" and serial(config) != revoked_serial
    assert config.private_key is not None and config.private_key.stat().st_mode & 0o777 == 0o600
    restarted = NodeServer(config)  # the same node.toml: ports, settings, database
    await restarted.start()
    net.nodes[1] = restarted
    await restarted.publisher.publish_pending()
    _, results = await collect(net.client(0), bsn_of(plan, held))
    assert results["node-2"].status == "ok" and results["node-2"].documents
    after = audit_reasons(config.database)
    assert after[: len(before)] == before  # the log goes on from where it was
    assert any("re-joined as node-2" in reason for reason in after[len(before) :])
    assert (await AuditLog(restarted.store.database, SystemClock()).verify()).ok


async def test_an_invite_that_made_another_node_replaces_nothing(
    network: NetworkFactory,
) -> None:
    """A token that does not say its node (an older one) is checked after the Join instead."""
    net = await network(n=2)
    second = net.nodes[1]
    await second.stop(0)
    assert second.config.private_key is not None
    key_before = second.config.private_key.read_bytes()
    for_another = invite.decode(await invite_again(net, "node-9", "URA-9"))
    unnamed = invite.encode(dataclasses.replace(for_another, node_id=""))
    with pytest.raises(ConfigError, match="the invite was for node node-9 of URA-9, not node-2"):
        await rejoin(unnamed, second.config)
    assert second.config.private_key.read_bytes() == key_before


@pytest.mark.parametrize(
    ("cut_at", "finished"),
    [(2, False), (3, True), (4, True)],
    ids=["staging the certificate", "before the swap", "between the two renames"],
)
async def test_a_rejoin_cut_off_leaves_a_node_that_starts(
    network: NetworkFactory, monkeypatch: pytest.MonkeyPatch, cut_at: int, finished: bool
) -> None:
    """Renames 1-2 stage the key and certificate, 3-4 swap them in; cut off at any one."""
    net = await network(n=2)
    second = net.nodes[1]
    config = second.config
    assert config.certificate is not None
    old_serial = serial(config)
    await operator.revoke(net.root / "registry.db", config.organisation_id)
    await second.stop(0)
    renames = 0
    real_replace = os.replace

    def killed_at_one(source: Any, target: Any) -> None:
        nonlocal renames
        renames += 1
        if renames == cut_at:
            raise KeyboardInterrupt  # the process dies here, as with Ctrl-C or SIGKILL
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", killed_at_one)
    with pytest.raises(KeyboardInterrupt):
        await rejoin(await invite_again(net, "node-2"), config)
    monkeypatch.setattr(os, "replace", real_replace)

    restarted = NodeServer(config)
    await restarted.start()  # never "the key does not belong to the certificate"
    net.nodes[1] = restarted
    assert not pki.staged(config.certificate).exists()
    assert (serial(config) != old_serial) == finished
    reasons = audit_reasons(config.database)
    assert any(r.startswith("finished a re-join cut off") for r in reasons) == finished
    if finished:
        await restarted.publisher.publish_pending()  # accepted: the new certificate is in use
