"""Load: many clinicians searching random patients at once over a Synthea network.

python -m tools.bench.load --clinicians 50 --seconds 60 [--data PATH]

The network is devnet's (``tools.devnet``): a registry and three nodes as
separate processes on loopback, mutual TLS, a Synthea set spread over the
facilities by service provider and devnet's consent (most pairs permit,
some give none, a few refuse node-1's organisation). Each clinician has
their own token at one of the three nodes and their own gateway channel,
and searches random patients back to back. Every answer is checked
against what the spread plan and the consent say it must be, so "fast"
can never hide "wrong": any other holder list or status, an error, a
timeout or an exception counts as a failed search.

The baseline is one clinician searching alone on the same network just
before the load, so p99 under load / p50 alone says what concurrency costs.
Bounded: setup, the load, then every process stopped, whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from node.store import NodeStore
from node.users import Clinicians
from tools import devnet
from tools.bench.common import Figure, p99
from tools.gateway_client import ClientError, FacilityResult, GatewayClient, Holders, NodeAccess
from tools.supervise import ProcessError
from transmural.errors import TransmuralError

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
#: The larger Synthea set (90 patients) for ``make bench``; tests use the 17-patient one.
DEFAULT_DATA = SHARED_DATA / "synthea-smart-r4" / "bundles"
NODES = 3
#: How long the lone clinician searches for the baseline.
ALONE_S = 3.0
#: One search, end to end, before it counts as failed: the node's own peer
#: deadline is 3 s, so this only fires when a gateway itself stalls, and it
#: keeps the whole run bounded.
SEARCH_TIMEOUT_S = 20.0
#: Failed searches described in the result (the rest are only counted).
EXAMPLES = 5
SEED = 6

#: node id -> the status that facility must answer with.
Expected = Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Patient:
    """A patient to search, and the right answer for each asking node."""

    fhir_id: str
    identifier: str  # system|value, as a clinician types it
    expected: tuple[Expected, ...]  # indexed by the asking node


@dataclass(frozen=True, slots=True)
class Clinician:
    user_id: str
    node: int  # index of the node whose gateway they use
    token: str


@dataclass
class LoadNetwork:
    """A running devnet with the load's clinicians and the patients' right answers."""

    net: devnet.DevNet
    clinicians: list[Clinician]
    patients: list[Patient]

    def access(self, clinician: Clinician) -> NodeAccess:
        config = self.net.configs[clinician.node]
        ca = None if config.ca_certificate is None else config.ca_certificate.read_bytes()
        return NodeAccess(
            self.net.gateway_address(clinician.node), clinician.token, ca, config.node_id
        )


@dataclass
class Tally:
    """Every search's latency, and what went wrong (counted; the first few described)."""

    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    examples: list[str] = field(default_factory=list)

    def record(self, latency_ms: float, problem: str | None) -> None:
        self.latencies_ms.append(latency_ms)
        if problem is not None:
            self.errors += 1
            if len(self.examples) < EXAMPLES:
                self.examples.append(problem)


@dataclass
class LoadResult:
    clinicians: int
    seconds: float  # asked for
    elapsed_s: float  # first search started to last search ended
    searches: int
    per_clinician: list[int]
    p50_ms: float
    p99_ms: float
    max_ms: float
    errors: int
    examples: list[str]
    alone_searches: int
    alone_p50_ms: float
    alone_per_s: float
    patients: int

    @property
    def per_s(self) -> float:
        return self.searches / self.elapsed_s if self.elapsed_s > 0 else 0.0


# --- the network ---


@asynccontextmanager
async def load_network(
    data: Path,
    clinicians: int,
    workdir: Path | None = None,
    say: Callable[[str], None] = print,
) -> AsyncIterator[LoadNetwork]:
    """devnet's network over ``data`` with ``clinicians`` accounts; always stopped after."""
    with _folder(workdir) as folder:
        net = devnet.prepare(folder, NODES, data, say)
        try:
            yield await _bring_up(net, clinicians, say)
        finally:
            net.stop()  # blocking on purpose: a cancelled run must still stop them


@contextmanager
def _folder(workdir: Path | None) -> Iterator[Path]:
    """The given folder (kept), or a temporary one removed afterwards."""
    if workdir is not None:
        yield workdir
        return
    with tempfile.TemporaryDirectory(prefix="transmural-load-") as temporary:
        yield Path(temporary)


async def _bring_up(net: devnet.DevNet, clinicians: int, say: Callable[[str], None]) -> LoadNetwork:
    """devnet's steps, in its order (admin.py), with our clinicians instead of its one.

    The blocking steps run on the loop's own thread on purpose: a cancel
    (SIGTERM) then lands between steps, never while a worker thread is
    still starting a server that ``DevNet.stop`` would not know about.
    """
    devnet.start_registry(net)
    await devnet.enrol(net, say)
    devnet.ingest_all(net, say)
    accounts = await add_clinicians(net, clinicians)
    refusing = _refusing_patients(net)
    await devnet.set_consent(net, set(), refusing)
    devnet.start_nodes(net)
    await devnet.wait_published(net)
    patients = searchable_patients(net, refusing)
    say(f"{len(accounts)} clinicians over {NODES} gateways, {len(patients)} patients to search")
    return LoadNetwork(net, accounts, patients)


async def add_clinicians(net: devnet.DevNet, count: int) -> list[Clinician]:
    """``count`` physicians, dealt round-robin over the nodes (before the nodes start)."""
    accounts: list[Clinician] = []
    for node, config in enumerate(net.configs):
        store = await NodeStore.open(config.database)
        try:
            users = Clinicians(store)
            for number in range(node, count, len(net.configs)):
                user_id = f"load-{number + 1:03d}"
                token = await users.add(user_id, f"Dr. Load {number + 1}", "physician")
                accounts.append(Clinician(user_id, node, token))
        finally:
            await store.close()
    return sorted(accounts, key=lambda c: c.user_id)


def _refusing_patients(net: devnet.DevNet) -> set[str]:
    """Every third patient held at 2+ facilities refuses node-1 at one of them.

    Enough ``consent-denied`` answers that the check sees both statuses, on
    any data set; chosen the same way every run.
    """
    multi = sorted(
        fhir_id
        for fhir_id, p in net.plan.patients.items()
        if len(p.nodes) >= 2 and _identifier(net, fhir_id) is not None
    )
    return set(multi[::3])


def _identifier(net: devnet.DevNet, fhir_id: str) -> str | None:
    identifiers = net.plan.patients[fhir_id].identifiers
    return devnet._national_identifier(identifiers, net.national_system)


def searchable_patients(net: devnet.DevNet, refusing: set[str]) -> list[Patient]:
    """Every patient with a national identifier, with the right answer per asking node."""
    patients = []
    for fhir_id in sorted(net.plan.patients):
        value = _identifier(net, fhir_id)
        if value is None:
            continue
        expected = tuple(
            expected_statuses(net, refusing, fhir_id, asker) for asker in range(len(net.configs))
        )
        patients.append(Patient(fhir_id, f"{net.national_system}|{value}", expected))
    return patients


def expected_statuses(net: devnet.DevNet, refusing: set[str], fhir_id: str, asker: int) -> Expected:
    """Which facilities must answer, and how, when node ``asker``'s clinician searches.

    From devnet's consent map: a permit means listed and ``ok``; no entry, or
    no consent at all, means not listed (opt-in: not locatable). A refusing
    patient's single ``False`` is devnet's deny of node-1's organisation: that
    facility stays listed, answers node-1 ``consent-denied`` and others ``ok``.
    """
    refused = net.configs[0].organisation_id
    expected: dict[str, str] = {}
    for index in net.plan.patients[fhir_id].nodes:
        allowed = net.consent.get((fhir_id, index))
        node_id = net.configs[index].node_id
        if allowed:
            expected[node_id] = "ok"
        elif allowed is False and fhir_id in refusing:
            asking_org = net.configs[asker].organisation_id
            expected[node_id] = "consent-denied" if asking_org == refused else "ok"
    return expected


# --- searching and checking ---


def check(expected: Expected, holders: Holders | None, results: list[FacilityResult]) -> str | None:
    """What is wrong with a search's answer, or None when it is exactly the expected one."""
    if holders is None:
        return "the stream did not open with the holders"
    if set(holders.node_ids) != set(expected):
        return f"listed {sorted(holders.node_ids)}, expected {sorted(expected)}"
    seen: set[str] = set()
    for result in results:
        want = expected.get(result.node_id)
        if want is None or result.node_id in seen:
            return f"unexpected answer from {result.node_id} ({result.status})"
        seen.add(result.node_id)
        if result.status != want:
            detail = f": {result.message[:80]}" if result.message else ""
            return f"{result.node_id} answered {result.status}{detail}, expected {want}"
    missing = sorted(set(expected) - seen)
    return f"no answer from {missing}" if missing else None


async def search_once(client: GatewayClient, patient: Patient, asker: int) -> str | None:
    """One search, checked; a description of the failure, or None."""
    holders: Holders | None = None
    results: list[FacilityResult] = []
    try:
        async with asyncio.timeout(SEARCH_TIMEOUT_S):
            async for event in client.search(patient.identifier):
                if isinstance(event, Holders):
                    holders = event
                else:
                    results.append(event)
    except TimeoutError:
        problem: str | None = f"no complete answer within {SEARCH_TIMEOUT_S:g} s"
    except ClientError as error:
        problem = f"client error: {error}"
    except Exception as error:  # a load test reports every failure, it does not stop
        problem = f"{type(error).__name__}: {error}"
    else:
        problem = check(patient.expected[asker], holders, results)
    if problem is None:
        return None
    return f"{patient.fhir_id[:8]} via node-{asker + 1}: {problem}"[:300]


async def _clinician_loop(
    client: GatewayClient,
    clinician: Clinician,
    patients: list[Patient],
    until: float,
    rng: random.Random,
    tally: Tally,
) -> int:
    """Search random patients back to back until ``until``; how many searches."""
    done = 0
    while time.perf_counter() < until:
        patient = rng.choice(patients)
        started = time.perf_counter()
        problem = await search_once(client, patient, clinician.node)
        tally.record((time.perf_counter() - started) * 1000, problem)
        done += 1
    return done


async def drive(
    load: LoadNetwork, clinicians: list[Clinician], seconds: float, seed: int = SEED
) -> tuple[Tally, list[int], float]:
    """Each clinician searching for ``seconds``: (tally, searches per clinician, elapsed s).

    One gateway client (one channel) per clinician, connected before the
    clock starts so no handshake is timed.
    """
    clients = [GatewayClient(load.access(c)) for c in clinicians]
    tally = Tally()
    try:
        await asyncio.gather(*(client.check() for client in clients))
        started = time.perf_counter()
        until = started + seconds
        counts = await asyncio.gather(*(
            _clinician_loop(client, c, load.patients, until, random.Random(seed + i), tally)
            for i, (client, c) in enumerate(zip(clients, clinicians, strict=True))
        ))  # fmt: skip
        return tally, list(counts), time.perf_counter() - started
    finally:
        for client in clients:
            await client.close()


async def measure(
    load: LoadNetwork, clinicians: int, seconds: float, alone_seconds: float = ALONE_S
) -> LoadResult:
    """The lone clinician's baseline, then ``clinicians`` at once for ``seconds``."""
    if not load.patients:
        raise ProcessError("the data set has no patient with a national identifier to search")
    alone, alone_counts, alone_elapsed = await drive(load, load.clinicians[:1], alone_seconds)
    tally, counts, elapsed = await drive(load, load.clinicians[:clinicians], seconds)
    latencies = tally.latencies_ms or [0.0]
    return LoadResult(
        clinicians=clinicians, seconds=seconds, elapsed_s=elapsed,
        searches=len(tally.latencies_ms), per_clinician=counts,
        p50_ms=statistics.median(latencies), p99_ms=p99(latencies), max_ms=max(latencies),
        errors=tally.errors + alone.errors, examples=(alone.examples + tally.examples)[:EXAMPLES],
        alone_searches=alone_counts[0],
        alone_p50_ms=statistics.median(alone.latencies_ms or [0.0]),
        alone_per_s=alone_counts[0] / alone_elapsed if alone_elapsed > 0 else 0.0,
        patients=len(load.patients),
    )  # fmt: skip


async def run(
    clinicians: int,
    seconds: float,
    data: Path = DEFAULT_DATA,
    alone_seconds: float = ALONE_S,
    workdir: Path | None = None,
    say: Callable[[str], None] = print,
) -> LoadResult:
    """Bring the network up, measure, stop every process: the whole bounded run."""
    async with load_network(data, clinicians, workdir, say) as load:
        say(f"one clinician alone for {alone_seconds:g} s, then {clinicians} for {seconds:g} s")
        return await measure(load, clinicians, seconds, alone_seconds)


# --- reporting ---


def figures(result: LoadResult) -> list[Figure]:
    """The report's rows: p99 under load vs p50 alone (the headline), throughput, failures."""
    where = (
        f"{result.clinicians} clinicians x {result.seconds:g} s, Synthea, {NODES} node processes"
    )
    tail = Figure(
        f"Load search p99 ({where})", "ms", "search p50, one clinician alone", None,
        higher_is_better=False, values=[result.p99_ms], baselines=[result.alone_p50_ms],
        notes=summary(result),
    )  # fmt: skip
    rate = Figure(
        f"Load searches/s ({where})", "searches/s", "searches/s, one clinician alone", None,
        values=[result.per_s], baselines=[result.alone_per_s],
    )  # fmt: skip
    failed = Figure(
        f"Load failed searches ({where})", "searches", "searches done", 0.0,
        higher_is_better=False, values=[float(result.errors)],
        baselines=[float(max(1, result.searches + result.alone_searches))],
        notes="; ".join(result.examples),
    )  # fmt: skip
    return [tail, rate, failed]


def summary(result: LoadResult) -> str:
    """One line: what ran, how fast, and whether anything failed."""
    least = min(result.per_clinician, default=0)
    return (
        f"{result.searches:,} searches of {result.patients} patients in {result.elapsed_s:.1f} s "
        f"({result.per_s:,.0f}/s, each clinician >= {least}); p50 {result.p50_ms:,.1f} ms, "
        f"p99 {result.p99_ms:,.1f} ms, max {result.max_ms:,.1f} ms; alone p50 "
        f"{result.alone_p50_ms:,.1f} ms; {result.errors or 'no'} errors"
    )


def shortfall(result: LoadResult) -> str | None:
    """The SHORT line when any search failed (the requirement is none), else None."""
    if not result.errors:
        return None
    total = result.searches + result.alone_searches
    first = result.examples[0] if result.examples else "?"
    return f"SHORT: {result.errors} of {total:,} searches failed; first: {first}"


# --- command line ---


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clinicians", type=int, default=50, help="at once (default 50)")
    parser.add_argument("--seconds", type=float, default=60.0, help="of load (default 60)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Synthea bundles folder")
    parser.add_argument("--alone-seconds", type=float, default=ALONE_S,
                        help="of the lone clinician's baseline (default %(default)s)")  # fmt: skip
    parser.add_argument("--workdir", type=Path, help="keep the network's files here")
    return parser


async def _main(args: argparse.Namespace) -> LoadResult:
    """``run``, with SIGTERM cancelling it so the servers are still stopped."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await run(args.clinicians, args.seconds, args.data, args.alone_seconds, args.workdir)


def cli(argv: list[str] | None = None) -> int:
    """0 when no search failed, 1 when any did or the network did not come up, 130 if stopped."""
    args = _parser().parse_args(argv)
    if args.clinicians < 1 or args.seconds <= 0 or args.alone_seconds <= 0:
        _parser().error("--clinicians, --seconds and --alone-seconds must be positive")
    try:
        result = asyncio.run(_main(args))
    except (ProcessError, TransmuralError) as error:
        print(f"load: {error}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("load: interrupted; every server it started is stopped", file=sys.stderr)
        return 130
    print(summary(result))
    for example in result.examples:
        print(f"  failed: {example}")
    short = shortfall(result)
    if short:
        print(short, file=sys.stderr)
    return 1 if short else 0


if __name__ == "__main__":
    sys.exit(cli())
