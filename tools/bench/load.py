"""Load: many clinicians searching random patients at once over a Synthea network.

python -m tools.bench.load --clinicians 50 --seconds 60 [--data PATH]

The network is devnet's (``tools.devnet``): a registry and three nodes as
separate processes on loopback, mutual TLS, a Synthea set spread over the
facilities by service provider and devnet's consent (most pairs permit,
some give none, a few refuse node-1's organisation). Each clinician has
their own token at one of the three nodes and their own gateway channel,
and searches random patients back to back. Every answer is checked
against what the spread plan and the consent say it must be, and each
``ok`` answer against the documents that facility ingested for the
patient (read from its database at setup), so "fast" can never hide
"wrong": any other holder list, status or document list, an error, a
timeout or an exception counts as a failed search.

The baseline is one clinician searching alone on the same network just
before the load, measured the same way, so p99 under load / p99 alone
says what concurrency costs. Bounded: at most MAX_SECONDS of load and
MAX_CLINICIANS, then every process stopped, whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import math
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
#: Bounds of the command line: a run stays bounded, and a typo cannot run for days.
MAX_SECONDS = 3600.0
MAX_CLINICIANS = 1000

#: node id -> the status that facility must answer with.
Expected = Mapping[str, str]
#: node id -> the sorted ids of the documents that facility holds for the patient.
Documents = Mapping[str, list[str]]


@dataclass(frozen=True, slots=True)
class Patient:
    """A patient to search, and the right answer for each asking node."""

    fhir_id: str
    identifier: str  # system|value, as a clinician types it
    expected: tuple[Expected, ...]  # indexed by the asking node
    documents: Documents  # what an ``ok`` answer of each holder must list


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
    alone_p99_ms: float
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
    held = await devnet.documents_held(net, sorted(net.plan.patients))
    devnet.start_nodes(net)
    await devnet.wait_published(net)
    patients = searchable_patients(net, refusing, held)
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


def searchable_patients(
    net: devnet.DevNet, refusing: set[str], held: Mapping[str, Documents]
) -> list[Patient]:
    """Every patient with a national identifier, with the right answer per asking node.

    ``held`` is ``devnet.documents_held``: per patient, each node's documents.
    """
    patients = []
    for fhir_id in sorted(net.plan.patients):
        value = _identifier(net, fhir_id)
        if value is None:
            continue
        expected = tuple(
            expected_statuses(net, refusing, fhir_id, asker) for asker in range(len(net.configs))
        )
        identifier = f"{net.national_system}|{value}"
        patients.append(Patient(fhir_id, identifier, expected, held.get(fhir_id, {})))
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


def check(
    expected: Expected, documents: Documents, holders: Holders | None, results: list[FacilityResult]
) -> str | None:
    """What is wrong with a search's answer, or None when it is exactly the expected one.

    Statuses alone would pass an ``ok`` that lists nothing: an ``ok`` must list
    exactly the documents that facility holds, any other status none at all.
    """
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
        if (problem := _wrong_documents(result, documents)) is not None:
            return problem
    missing = sorted(set(expected) - seen)
    return f"no answer from {missing}" if missing else None


def _wrong_documents(result: FacilityResult, documents: Documents) -> str | None:
    """How ``result``'s documents differ from what its facility holds (None: they do not)."""
    want = sorted(documents.get(result.node_id, [])) if result.status == "ok" else []
    got = sorted(d.document_id for d in result.documents)
    if got == want:
        return None
    other = " (other ids)" if len(got) == len(want) else ""
    said = f"{result.node_id} answered {result.status} with {len(got)} documents{other}"
    return f"{said}, expected {f'its {len(want)}' if want else 'none'}"


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
        problem = check(patient.expected[asker], patient.documents, holders, results)
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
    """The lone clinician's baseline, then ``clinicians`` at once for ``seconds``.

    Both timed the same way, so their p99s compare: the headline is their ratio.
    """
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
        alone_p99_ms=p99(alone.latencies_ms or [0.0]),
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
    """The report's rows: p99 under load vs p99 alone (the headline), throughput, failures.

    Each is one run, so its min / median / max are one value: the notes say so.
    Failures have an absolute goal (none), not a ratio to reach.
    """
    where = (
        f"{result.clinicians} clinicians x {result.seconds:g} s, Synthea, {NODES} node processes"
    )
    once = f"one run of {result.seconds:g} s, so min = median = max"
    tail = Figure(
        f"Load search p99 ({where})", "ms", "search p99, one clinician alone", None,
        higher_is_better=False, values=[result.p99_ms], baselines=[result.alone_p99_ms],
        notes=f"{once}: {summary(result)}",
    )  # fmt: skip
    rate = Figure(
        f"Load searches/s ({where})", "searches/s", "searches/s, one clinician alone", None,
        values=[result.per_s], baselines=[result.alone_per_s], notes=once,
    )  # fmt: skip
    failed = Figure(
        f"Load failed searches ({where})", "searches", "searches done, alone and under load", None,
        higher_is_better=False, values=[float(result.errors)],
        baselines=[float(max(1, result.searches + result.alone_searches))],
        notes="; ".join([once, *result.examples]), limit=0.0,
    )  # fmt: skip
    return [tail, rate, failed]


def summary(result: LoadResult) -> str:
    """One line: what ran, how fast, and whether anything failed."""
    least = min(result.per_clinician, default=0)
    return (
        f"{result.searches:,} searches of {result.patients} patients in {result.elapsed_s:.1f} s "
        f"({result.per_s:,.0f}/s, each clinician >= {least}); p50 {result.p50_ms:,.1f} ms, "
        f"p99 {result.p99_ms:,.1f} ms, max {result.max_ms:,.1f} ms; alone p50 "
        f"{result.alone_p50_ms:,.1f} ms, p99 {result.alone_p99_ms:,.1f} ms; "
        f"{result.errors or 'no'} errors"
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
    parser.add_argument("--clinicians", type=_clinicians, default=50,
                        help=f"at once, 1 to {MAX_CLINICIANS} (default 50)")  # fmt: skip
    parser.add_argument("--seconds", type=_seconds, default=60.0,
                        help=f"of load, at most {MAX_SECONDS:g} (default 60)")  # fmt: skip
    # A string default goes through ``type`` too: a missing default folder is refused as well.
    parser.add_argument("--data", type=_bundles_folder, default=str(DEFAULT_DATA),
                        help="Synthea bundles folder (default %(default)s)")  # fmt: skip
    parser.add_argument("--alone-seconds", type=_seconds, default=ALONE_S,
                        help="of the lone clinician's baseline (default %(default)s)")  # fmt: skip
    parser.add_argument("--workdir", type=Path, help="keep the network's files here")
    return parser


def _bounded(number: type[float], high: float, what: str) -> Callable[[str], float]:
    """An argparse type: ``number(text)`` above 0 and at most ``high``.

    ``float("nan")`` and ``float("inf")`` parse: finite is checked too, since
    nan compares false with everything (a run that does nothing and passes)
    and inf would never end.
    """

    def convert(text: str) -> float:
        try:
            value = number(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and 0 < value <= high):
            raise argparse.ArgumentTypeError(
                f"must be {what} above 0 and at most {high:g}, not {text!r}"
            )
        return value

    return convert


_seconds = _bounded(float, MAX_SECONDS, "a number of seconds")
_clinicians = _bounded(int, MAX_CLINICIANS, "a whole number")


def _bundles_folder(text: str) -> Path:
    """argparse type: an existing folder, checked before any network is made."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not a folder")
    return path


async def _main(args: argparse.Namespace) -> LoadResult:
    """``run``, with SIGTERM cancelling it so the servers are still stopped."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await run(args.clinicians, args.seconds, args.data, args.alone_seconds, args.workdir)


def cli(argv: list[str] | None = None) -> int:
    """0 when no search failed, 1 when any did or the network did not come up, 130 if stopped."""
    args = _parser().parse_args(argv)
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
