"""A whole network on one machine: a registry and N nodes on loopback.

    workdir/
      network/               the operator's CA, registry certificate, network key
      network.json           where everything is, written once all is up
      source/                generated synthetic bundles (when no --data)
      registry/              registry.db, server.log
      node-1/ ...            node.key, node.crt, ca.crt, network.key (from join),
                             node.toml, node.db, bundles/, client.json (0600),
                             server.log, ingest.log

The network is created, invited and joined exactly as an operator and the
facilities would (``transmural-admin network init``, ``invite``, ``join``),
and every server talks mutual TLS; ``insecure=True`` (``--insecure-dev``)
runs plain gRPC with one shared key file instead.

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
from node.consent_desk import ConsentDesk
from node.store import NodeStore
from node.users import Clinicians
from registry import operator
from registry.network import init_network
from tools.bootstrap import ensure_joined, write_node_config
from tools.client_settings import write_settings
from tools.gateway_client import NodeAccess
from tools.spread import SpreadPlan, national_system, spread
from tools.supervise import ProcessError, ServerProcess, start_server
from tools.synthetic import generate
from transmural.errors import InvalidIdentifier
from transmural.identifiers import canonical
from transmural.process import dying_with_parent
from transmural.pseudonym import new_network_key, write_network_key

CLINICIAN_NAMES = ("Dr. A. de Vries", "Dr. B. Jansen", "Dr. C. Bakker", "Dr. D. Visser")
#: Share of (patient, facility) pairs without consent to exchange.
NO_CONSENT_SHARE = 0.15
PUBLISH_TIMEOUT_S = 60.0


@dataclass
class DevNet:
    workdir: Path
    plan: SpreadPlan
    national_system: str
    insecure: bool
    configs: list[NodeConfig] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    consent: dict[tuple[str, int], bool] = field(default_factory=dict)
    registry: ServerProcess | None = None
    nodes: list[ServerProcess] = field(default_factory=list)

    @property
    def network_dir(self) -> Path:
        return self.workdir / "network"

    @property
    def registry_db(self) -> Path:
        return self.workdir / "registry" / "registry.db"

    def node_dir(self, index: int) -> Path:
        return self.workdir / f"node-{index + 1}"

    def node_address(self, index: int) -> str:
        return self.nodes[index].address

    def gateway_address(self, index: int) -> str:
        return str(self.nodes[index].ready["gateway_address"])

    def access(self, index: int) -> NodeAccess:
        """How node ``index``'s demo clinician reaches its gateway."""
        config = self.configs[index]
        ca = None if config.ca_certificate is None else config.ca_certificate.read_bytes()
        return NodeAccess(self.gateway_address(index), self.tokens[index], ca, config.node_id)

    def stop(self) -> None:
        for server in [*self.nodes, *([self.registry] if self.registry else [])]:
            server.stop()


def default_workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="transmural-devnet-"))


def prepare(
    workdir: Path,
    nodes: int,
    data: Path | None,
    say: Callable[[str], None],
    insecure: bool = False,
) -> DevNet:
    """The network's keys, and the data spread over ``nodes`` facilities.

    A ``data`` folder that is not there is refused before anything is made:
    no network keys for a run that cannot start.
    """
    if data is not None and not data.is_dir():
        raise ProcessError(f"--data {data}: not a folder")
    if workdir.exists() and (not workdir.is_dir() or any(workdir.iterdir())):
        # Never take over (and chmod) a folder holding something else: /etc, a home.
        raise ProcessError(f"--workdir {workdir}: not an empty folder; give a new or empty one")
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o700)  # an empty folder the user made may be 0755; patient data goes in
    if insecure:
        write_network_key(workdir / "network.key", new_network_key())
    else:
        network = init_network(workdir / "network", "Transmural devnet")
        say(f"network CA fingerprint {network.ca_fingerprint[:16]}… in {workdir / 'network'}")
    if data is None:
        data = workdir / "source"
        files = generate(data)
        say(f"generated {len(files)} synthetic patient bundles in {data}")
    node_dirs = [workdir / f"node-{i + 1}" for i in range(nodes)]
    plan = spread(data, [d / "bundles" for d in node_dirs])
    system = national_system(plan)
    say(
        f"spread {len(plan.patients)} patients over {nodes} facilities (identifier system {system})"
    )
    return DevNet(workdir, plan, system, insecure)


def _facility_name(plan: SpreadPlan, index: int) -> str:
    names = plan.nodes[index].organisations
    return names[0] if names else f"Facility {index + 1}"


def start_registry(net: DevNet) -> None:
    folder = net.workdir / "registry"
    trust = ["--insecure-dev"] if net.insecure else ["--network-dir", str(net.network_dir)]
    net.registry = start_server(
        "registry",
        "registry.cli",
        ["--db", str(net.registry_db), "--listen", "127.0.0.1:0",
         "--join-listen", "127.0.0.1:0", *trust],
        folder,
    )  # fmt: skip
    net.registry.wait_ready()


async def enrol(net: DevNet, say: Callable[[str], None]) -> None:
    """Invite and join every facility (flow 2), then write each node.toml."""
    assert net.registry is not None
    for index in range(len(net.plan.nodes)):
        folder = net.node_dir(index)
        name = _facility_name(net.plan, index)
        organisation_id = f"URA-{90000001 + index}"
        if net.insecure:
            config = NodeConfig(
                node_id=f"node-{index + 1}", organisation_name=name,
                organisation_id=organisation_id, registry=net.registry.address,
                database=folder / "node.db", network_key_file=net.workdir / "network.key",
                national_system=net.national_system, insecure_dev=True,
            )  # fmt: skip
            write_node_config(folder, config)
        else:
            token = await operator.invite(
                net.network_dir, net.registry_db, organisation_id, name,
                node_id=f"node-{index + 1}",
                join_address=str(net.registry.ready["join_address"]),
                organisation_category=facility_category(name),
            )  # fmt: skip
            # The same first-start step as a container's (compose/entrypoint.sh).
            config = await ensure_joined(folder, token, national_system=net.national_system)
            say(f"{config.node_id} joined as {name} ({organisation_id})")
            # The demo network allows break-the-glass (a network-wide setting).
            config = dataclasses.replace(config, break_the_glass=True)
            write_node_config(folder, config)
        net.configs.append(config)


#: Words in a facility's name that say what kind it is (else: a hospital).
_CATEGORY_WORDS = {
    "gp": ("huisarts", "general practice", "family", "pcp"),
    "pharmacy": ("apotheek", "pharmacy", "walgreens", "cvs"),
    "nursing-home": ("verpleeghuis", "nursing", "zorgcentrum"),
}


def facility_category(name: str) -> str:
    """The kind of facility, guessed from its name, for its certificate's OU."""
    lowered = name.lower()
    for category, words in _CATEGORY_WORDS.items():
        if any(word in lowered for word in words):
            return category
    return "hospital"


async def add_clinicians(net: DevNet) -> None:
    """One clinician per facility; their tokens go into each client.json."""
    for index, config in enumerate(net.configs):
        store = await NodeStore.open(config.database)
        try:
            net.tokens.append(
                await Clinicians(store).add(
                    f"physician-{index + 1}", CLINICIAN_NAMES[index % len(CLINICIAN_NAMES)],
                    "physician",
                )
            )  # fmt: skip
        finally:
            await store.close()


def write_client_files(net: DevNet) -> None:
    """Each node's client settings (gateway, CA, token), owner-only."""
    for index, config in enumerate(net.configs):
        access = net.access(index)
        settings = {"node": access.address, "node_id": config.node_id, "token": access.token}
        if config.ca_certificate is not None:
            settings["ca_certificate"] = str(config.ca_certificate)
        write_settings(net.node_dir(index) / "client.json", settings)


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
                    dying_with_parent(
                        [
                            sys.executable,
                            "-m",
                            "tools.admin",
                            "ingest",
                            "--config",
                            str(folder / "node.toml"),
                            str(folder / "bundles"),
                        ]
                    ),
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
    """Consent recorded at the desk for most (patient, facility) pairs.

    Most pairs get a permit for all organisations; about NO_CONSENT_SHARE get
    none (opt-in: that facility neither answers nor lists the patient).
    ``keep_consent`` patients permit everywhere; ``deny_once`` patients
    permit everyone but refuse node-1's organisation at the last facility
    that holds them, so the demo shows a ``consent-denied`` answer.
    """
    rng = random.Random(2)
    asker = net.configs[0].organisation_id
    stores = [await NodeStore.open(c.database) for c in net.configs]
    try:
        desks = [ConsentDesk(store) for store in stores]
        for fhir_id in sorted(net.plan.patients):
            patient = net.plan.patients[fhir_id]
            identifier = _national_identifier(patient.identifiers, net.national_system)
            if identifier is None:
                continue
            for position, index in enumerate(patient.nodes):
                record = await stores[index].patient_by_identifier(
                    canonical(net.national_system, identifier)
                )
                if record is None:
                    continue
                desk = desks[index]
                refuse_asker = fhir_id in deny_once and position == len(patient.nodes) - 1
                allowed = fhir_id in keep_consent or fhir_id in deny_once
                allowed = allowed or rng.random() >= NO_CONSENT_SHARE
                consents = (
                    [desk.blanket(record.patient_key, True, "devnet desk")] if allowed else []
                )
                if refuse_asker:
                    deny = desk.blanket(record.patient_key, False, "devnet desk")
                    consents.append(
                        dataclasses.replace(deny, actor_kind="organisation", actor=asker)
                    )
                if consents:
                    await desk.record(consents)
                net.consent[(fhir_id, index)] = allowed and not refuse_asker
    finally:
        for store in stores:
            await store.close()


async def documents_held(net: DevNet, fhir_ids: list[str]) -> dict[str, dict[str, list[str]]]:
    """Per patient, per node that has them, the sorted ids of the documents it ingested.

    Read from each node's database (once per node), so a search can be
    checked against what the node really holds, not only against the plan.
    A node without the patient is absent; one with the patient but no
    document has an empty list. Patients without a national identifier
    (not searchable) have no entry at any node.
    """
    held: dict[str, dict[str, list[str]]] = {fhir_id: {} for fhir_id in fhir_ids}
    for config in net.configs:
        store = await NodeStore.open(config.database)
        try:
            for fhir_id in fhir_ids:
                value = _national_identifier(net.plan.patients[fhir_id].identifiers,
                                             net.national_system)  # fmt: skip
                if value is None:
                    continue
                patient = await store.patient_by_identifier(canonical(net.national_system, value))
                if patient is not None:
                    documents = await store.documents_of(patient.patient_key)
                    held[fhir_id][config.node_id] = sorted(d.document_id for d in documents)
        finally:
            await store.close()
    return held


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
            start_server(config.node_id, "node.cli", ["--config", str(folder / "node.toml")],
                         folder)
        )  # fmt: skip
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
        "transport": "insecure-dev (plain gRPC)" if net.insecure else "mutual TLS",
        "network_dir": None if net.insecure else str(net.network_dir),
        "national_system": net.national_system,
        "registry": {
            "name": "registry",
            "address": net.registry.address,
            "join_address": net.registry.ready.get("join_address"),
            "data_dir": str(registry_dir),
            "database": str(net.registry_db),
            "log": str(net.registry.log_file),
        },
        "nodes": [_node_entry(net, index) for index in range(len(net.configs))],
    }
    path = net.workdir / "network.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)
    return path


def _node_entry(net: DevNet, index: int) -> dict[str, object]:
    config, server = net.configs[index], net.nodes[index]
    folder = config.database.parent
    return {
        "name": config.node_id,
        "organisation_name": config.organisation_name,
        "organisation_id": config.organisation_id,
        "address": server.address,
        "gateway_address": net.gateway_address(index),
        "data_dir": str(folder),
        "database": str(config.database),
        "config": str(folder / "node.toml"),
        "log": str(server.log_file),
        "client": {
            "TRANSMURAL_CONFIG": str(folder / "client.json"),
            "TRANSMURAL_NODE": net.gateway_address(index),
            "TRANSMURAL_NODE_ID": config.node_id,
            "TRANSMURAL_CA": str(config.ca_certificate or ""),
            "national_system": net.national_system,
        },
    }


@contextmanager
def running(net: DevNet) -> Iterator[DevNet]:
    try:
        yield net
    finally:
        net.stop()
