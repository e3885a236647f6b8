"""A whole network on one machine: a registry and N nodes on loopback.

    workdir/
      network.key            the network pseudonymisation key (0600)
      network.json           where everything is, written once all is up
      source/                generated synthetic bundles (when no --data)
      registry/              registry.db, server.log
      node-1/ ...            node.toml, node.db, bundles/, server.log, ingest.log

The folder is made owner-only (0700) and the caller runs with umask 077
(``tools.admin`` does), so nothing in it is readable by others.

Patients' data is spread over the nodes by each encounter's service
provider (``tools.spread``), each node ingests its share with
``transmural-admin ingest``, consent is set for most but not all
patients, and the servers run as separate processes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from node.config import NodeConfig
from node.store import NodeStore
from tools.spread import SpreadPlan, national_system, spread
from tools.supervise import ProcessError, ServerProcess, start_server
from tools.synthetic import generate
from transmural.errors import InvalidIdentifier
from transmural.identifiers import canonical
from transmural.pseudonym import new_network_key, write_network_key

#: Share of (patient, facility) pairs without consent to exchange.
NO_CONSENT_SHARE = 0.15
PUBLISH_TIMEOUT_S = 60.0


@dataclass
class DevNet:
    workdir: Path
    plan: SpreadPlan
    national_system: str
    configs: list[NodeConfig]
    consent: dict[tuple[str, int], bool] = field(default_factory=dict)
    registry: ServerProcess | None = None
    nodes: list[ServerProcess] = field(default_factory=list)

    def node_address(self, index: int) -> str:
        return self.nodes[index].address

    def stop(self) -> None:
        for server in [*self.nodes, *([self.registry] if self.registry else [])]:
            server.stop()


def default_workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="transmural-devnet-"))


def prepare(workdir: Path, nodes: int, data: Path | None, say: Callable[[str], None]) -> DevNet:
    """Key, data spread over nodes, node configs, ingest and consent."""
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o700)  # a folder the user made may be 0755; patient data goes in
    key_file = workdir / "network.key"
    write_network_key(key_file, new_network_key())
    if data is None:
        data = workdir / "source"
        files = generate(data)
        say(f"generated {len(files)} synthetic patient bundles in {data}")
    elif not data.is_dir():
        raise ProcessError(f"--data {data}: not a folder")
    node_dirs = [workdir / f"node-{i + 1}" for i in range(nodes)]
    plan = spread(data, [d / "bundles" for d in node_dirs])
    system = national_system(plan)
    say(
        f"spread {len(plan.patients)} patients over {nodes} facilities (identifier system {system})"
    )
    configs = [
        NodeConfig(
            node_id=f"node-{i + 1}",
            organisation_name=_facility_name(plan, i),
            organisation_id=f"devnet-{i + 1}",
            registry="127.0.0.1:1",  # replaced once the registry runs
            database=d / "node.db",
            network_key_file=key_file,
            national_system=system,
        )
        for i, d in enumerate(node_dirs)
    ]
    return DevNet(workdir, plan, system, configs)


def _facility_name(plan: SpreadPlan, index: int) -> str:
    names = plan.nodes[index].organisations
    return names[0] if names else f"Facility {index + 1}"


def start_registry(net: DevNet) -> None:
    folder = net.workdir / "registry"
    net.registry = start_server(
        "registry",
        "registry.cli",
        ["--db", str(folder / "registry.db"), "--listen", "127.0.0.1:0"],
        folder,
    )
    net.registry.wait_ready()


def write_configs(net: DevNet) -> None:
    assert net.registry is not None
    net.configs = [dataclasses.replace(c, registry=net.registry.address) for c in net.configs]
    for config in net.configs:
        folder = config.database.parent
        (folder / "node.toml").write_text(config.to_toml(folder))


def ingest_all(net: DevNet, say: Callable[[str], None]) -> None:
    """Each node ingests its share, as separate processes, a core each."""
    pending = list(net.configs)
    running: list[tuple[NodeConfig, subprocess.Popen[bytes]]] = []
    workers = max(1, os.cpu_count() or 1)
    while pending or running:
        while pending and len(running) < workers:
            config = pending.pop(0)
            folder = config.database.parent
            with (folder / "ingest.log").open("wb") as log:
                process = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "tools.admin",
                        "ingest",
                        "--config",
                        str(folder / "node.toml"),
                        str(folder / "bundles"),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            running.append((config, process))
        config, process = running.pop(0)
        if process.wait() != 0:
            log_text = (config.database.parent / "ingest.log").read_text(errors="replace")
            raise ProcessError(f"ingest into {config.node_id} failed:\n{log_text[-2000:]}")
        summary = (config.database.parent / "ingest.log").read_text().strip().splitlines()
        say(f"{config.node_id} ingested {summary[-1] if summary else 'its share'}")


async def set_consent(net: DevNet, keep_consent: set[str], deny_once: set[str]) -> None:
    """Consent for most (patient, facility) pairs; none where chosen.

    ``keep_consent`` patients consent everywhere; ``deny_once`` patients
    refuse at the last facility that holds them, so the demo shows both.
    """
    rng = random.Random(2)
    stores = [await NodeStore.open(c.database) for c in net.configs]
    try:
        for fhir_id in sorted(net.plan.patients):
            patient = net.plan.patients[fhir_id]
            identifier = _national_identifier(patient.identifiers, net.national_system)
            if identifier is None:
                continue
            for position, index in enumerate(patient.nodes):
                if fhir_id in keep_consent:
                    allowed = True
                elif fhir_id in deny_once:
                    allowed = position != len(patient.nodes) - 1
                else:
                    allowed = rng.random() >= NO_CONSENT_SHARE
                record = await stores[index].patient_by_identifier(
                    canonical(net.national_system, identifier)
                )
                if record is not None:
                    await stores[index].set_exchange_consent(record.patient_key, allowed)
                    net.consent[(fhir_id, index)] = allowed
    finally:
        for store in stores:
            await store.close()


def _national_identifier(identifiers: list[tuple[str, str]], system: str) -> str | None:
    for id_system, value in identifiers:
        try:
            if canonical(id_system, value).system == system:
                return value
        except InvalidIdentifier:
            continue
    return None


def start_nodes(net: DevNet) -> None:
    for config in net.configs:
        folder = config.database.parent
        net.nodes.append(
            start_server(
                config.node_id, "node.cli", ["--config", str(folder / "node.toml")], folder
            )
        )
    for server in net.nodes:
        server.wait_ready()


async def wait_published(net: DevNet) -> None:
    """Until every node's outbox is empty: the index is complete."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PUBLISH_TIMEOUT_S
    for config, server in zip(net.configs, net.nodes, strict=True):
        store = await NodeStore.open(config.database)
        try:
            while await store.pending_index_count():
                if loop.time() > deadline or server.process.poll() is not None:
                    raise ProcessError(
                        f"{config.node_id} did not publish its index:\n{server.log_tail()}"
                    )
                await asyncio.sleep(0.1)
        finally:
            await store.close()


def write_network_json(net: DevNet) -> Path:
    assert net.registry is not None
    registry_dir = net.workdir / "registry"
    doc = {
        "workdir": str(net.workdir),
        "network_key_file": str(net.workdir / "network.key"),
        "national_system": net.national_system,
        "registry": {
            "name": "registry",
            "address": net.registry.address,
            "data_dir": str(registry_dir),
            "database": str(registry_dir / "registry.db"),
            "log": str(net.registry.log_file),
        },
        "nodes": [
            {
                "name": config.node_id,
                "organisation_name": config.organisation_name,
                "address": server.address,
                "data_dir": str(config.database.parent),
                "database": str(config.database),
                "config": str(config.database.parent / "node.toml"),
                "log": str(server.log_file),
                "client": {
                    "TRANSMURAL_NODE": server.address,
                    "national_system": net.national_system,
                },
            }
            for config, server in zip(net.configs, net.nodes, strict=True)
        ],
    }
    path = net.workdir / "network.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)
    return path


@contextmanager
def running(net: DevNet) -> Iterator[DevNet]:
    try:
        yield net
    finally:
        net.stop()
