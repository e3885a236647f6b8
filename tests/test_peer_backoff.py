"""A failing facility is asked again only after a back-off window (issue 6: overload).

The domain object (``PeerHealth``) runs on a fake clock; the rest runs a
real network on loopback: a facility whose port drops every connection, one
whose front answers UNAVAILABLE, one that hangs (on a search or a fetch),
one that is stopped and comes back on its old address. Back-off constants
are shrunk or stretched per test with monkeypatch (``PeerChannels`` reads
them when a node starts).
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import re
from pathlib import Path

import grpc
import pytest

from node import peer_health
from node.answers import Status
from node.ingest import ingest_file
from node.peer_health import Attempt, NotAsked, PeerHealth
from node.server import NodeServer
from tests.conftest import (
    NetworkFactory,
    RunningNetwork,
    collect,
    publish_as,
    start_silent_peer,
    wait_for,
)
from tests.test_ingest import bundle_of, dutch_patient, note
from tools.gateway_client import ClientError, FacilityResult, GatewayClient
from transmural import pki, transport
from transmural.identifiers import BSN_SYSTEM, canonical

BSN = "111222333"


class FakeClock:
    """Time that moves only when the test says so."""

    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def now(self) -> float:
        return self.t

    def monotonic(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def _attempt(health: PeerHealth, peer: str = "p") -> Attempt:
    admitted = health.admit(peer)
    assert isinstance(admitted, Attempt), admitted
    return admitted


def _not_asked(health: PeerHealth, peer: str = "p") -> NotAsked:
    admitted = health.admit(peer)
    assert isinstance(admitted, NotAsked), admitted
    return admitted


# --- the domain object, on a fake clock --------------------------------------------------


def test_each_failed_probe_doubles_the_window_up_to_the_cap() -> None:
    clock = FakeClock()
    health = PeerHealth(clock, jitter=0.0)  # the real first window and cap
    windows = []
    for _ in range(8):
        attempt = _attempt(health)
        window = health.failed(attempt, Status.UNREACHABLE, "could not connect")
        assert window is not None
        windows.append(window)
        clock.advance(window - 0.01)
        assert _not_asked(health).retry_in_s == pytest.approx(0.01)
        clock.advance(0.01)
    assert windows == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0, 8.0]


def test_jitter_only_shortens_the_window() -> None:
    low = PeerHealth(FakeClock(), first_s=1.0, max_s=30.0, jitter=0.2, rand=lambda: 1.0)
    high = PeerHealth(FakeClock(), first_s=1.0, max_s=30.0, jitter=0.2, rand=lambda: 0.0)
    assert [low.window(n) for n in (1, 3, 9)] == pytest.approx([0.8, 3.2, 24.0])
    assert [high.window(n) for n in (1, 3, 9)] == [1.0, 4.0, 30.0]
    spread = PeerHealth(FakeClock(), first_s=1.0, max_s=30.0, jitter=0.2)
    assert all(0.8 <= spread.window(1) <= 1.0 for _ in range(200))


def test_while_backing_off_the_answer_is_the_last_failure_and_when_it_is_retried() -> None:
    clock = FakeClock()  # 2023-11-14 22:13:20 UTC
    health = PeerHealth(clock, first_s=4.0, jitter=0.0)
    health.failed(_attempt(health), Status.TIMEOUT, "no answer before the deadline")
    clock.advance(1.5)

    answer = _not_asked(health)

    assert answer.status is Status.TIMEOUT
    assert answer.retry_in_s == pytest.approx(2.5)
    assert "no answer before the deadline" in answer.message
    assert "retried after 22:13:24 UTC, in 2.5 s" in answer.message


def test_one_probe_at_a_time_and_others_get_the_fast_answer_meanwhile() -> None:
    clock = FakeClock()
    health = PeerHealth(clock, first_s=1.0, jitter=0.0)
    health.failed(_attempt(health), Status.UNREACHABLE, "could not connect")
    clock.advance(1.0)

    probe = _attempt(health)
    assert probe.probe
    meanwhile = _not_asked(health)
    assert "another request is retrying it now" in meanwhile.message
    assert meanwhile.status is Status.UNREACHABLE

    health.abandoned(probe)  # e.g. the clinician cancelled the search
    assert _attempt(health).probe, "a cancelled probe must not block the peer for good"


def test_an_answer_clears_the_failures() -> None:
    clock = FakeClock()
    health = PeerHealth(clock, first_s=1.0, jitter=0.0)
    for _ in range(3):
        health.failed(_attempt(health), Status.UNREACHABLE, "could not connect")
        clock.advance(10.0)
    assert health.answered(_attempt(health)) is True

    fresh = _attempt(health)
    assert not fresh.probe and fresh.round == 0
    assert health.failed(fresh, Status.UNREACHABLE, "could not connect") == 1.0


def test_calls_failing_together_count_as_one_failure() -> None:
    """A burst of searches that were all on their way when the peer fell over."""
    health = PeerHealth(FakeClock(), first_s=1.0, jitter=0.0)
    burst = [_attempt(health) for _ in range(5)]
    windows = [health.failed(a, Status.TIMEOUT, "no answer before the deadline") for a in burst]
    assert windows == [1.0, None, None, None, None]
    assert "at the last try;" in _not_asked(health).message


def test_a_timeout_under_a_short_deadline_does_not_count() -> None:
    """One clinician's impatience must not black a facility out for colleagues."""
    clock = FakeClock()
    health = PeerHealth(clock, first_s=1.0, jitter=0.0, shortest_judged_s=1.0)
    timeout = Status.TIMEOUT, "no answer before the deadline"
    assert health.failed(_attempt(health), *timeout, deadline_s=0.3) is None
    assert not _attempt(health).probe
    assert health.failed(_attempt(health), *timeout, deadline_s=1.0) == 1.0
    clock.advance(1.0)
    probe = _attempt(health)
    assert health.failed(probe, *timeout, deadline_s=0.3) is None
    assert _attempt(health).probe, "a probe cut short by its own deadline frees the way"
    # Not reaching the peer at all is telling whatever the deadline.
    assert health.failed(_attempt(health, "b"), Status.UNREACHABLE, "x", deadline_s=0.1) == 1.0


def test_a_check_ends_the_window_once_the_peer_was_seen_down_and_serves_again() -> None:
    """A frozen facility (timed out, checks fail) that thaws: the next call asks it."""
    clock = FakeClock()
    health = PeerHealth(clock, first_s=4.0, jitter=0.0)
    health.failed(_attempt(health), Status.TIMEOUT, "no answer before the deadline")
    assert health.checked("p", serving=False) is False
    _not_asked(health)
    clock.advance(1.0)
    assert health.checked("p", serving=True) is True
    assert health.window_left("p") is None

    probe = _attempt(health)
    assert probe.probe and probe.round == 1, "the failures in a row are kept"
    assert health.failed(probe, Status.TIMEOUT, "no answer before the deadline") == 8.0


def test_a_check_does_not_end_the_window_of_a_peer_that_served_all_along() -> None:
    """Its calls hang while its health service answers: the window runs its course."""
    clock = FakeClock()
    health = PeerHealth(clock, first_s=4.0, jitter=0.0)
    health.failed(_attempt(health), Status.TIMEOUT, "no answer before the deadline")
    for _ in range(3):
        clock.advance(1.0)
        assert health.checked("p", serving=True) is False
        assert health.window_left("p") == pytest.approx(4.0 - (clock.t - 1_700_000_000.0))
    clock.advance(1.0)
    assert health.window_left("p") is None and _attempt(health).probe


def test_a_peer_not_reached_ends_its_window_at_the_first_serving_check() -> None:
    """Stopped, then restarted on its address: nothing proved it up since it was down."""
    health = PeerHealth(FakeClock(), first_s=8.0, jitter=0.0)
    assert health.checked("p", serving=True) is False, "a healthy peer has no window"
    health.failed(_attempt(health), Status.UNREACHABLE, "could not connect")
    assert health.checked("p", serving=True) is True
    assert _attempt(health).probe


def test_checks_come_about_once_a_second_jittered() -> None:
    assert PeerHealth(FakeClock(), rand=lambda: 0.0).check_delay() == 1.0
    assert PeerHealth(FakeClock(), rand=lambda: 1.0).check_delay() == pytest.approx(0.8)


def test_peers_back_off_independently() -> None:
    health = PeerHealth(FakeClock(), first_s=1.0, jitter=0.0)
    health.failed(_attempt(health, "a"), Status.UNREACHABLE, "could not connect")
    _not_asked(health, "a")
    assert not _attempt(health, "b").probe


# --- a real network on loopback ----------------------------------------------------------


def _member_tls(net: RunningNetwork, node_id: str) -> transport.TlsFiles:
    """Certificate and key of a member facility ``node_id``, from the test network's CA."""
    network = net.registry.network
    assert network is not None
    key = pki.new_private_key()
    cert = pki.issue_node_certificate(
        network.ca_key, network.ca_cert, pki.make_csr(key, node_id), node_id,
        f"URA-{node_id}", f"{node_id} facility",
    )  # fmt: skip
    return transport.TlsFiles(pki.pem(network.ca_cert), pki.pem(cert), pki.key_pem(key))


async def _patient_at_both(
    network: NetworkFactory, tmp_path: Path, **settings: object
) -> tuple[RunningNetwork, bytes]:
    """Two nodes that both hold patient BSN and may share; returns the net and the pseudonym."""
    net = await network(n=2, **settings)
    bundle = tmp_path / "patient.json"
    bundle.write_text(json.dumps(bundle_of(dutch_patient("p1", BSN), note("n1", "p1"))))
    for node in net.nodes:
        await ingest_file(node.store, bundle, net.pseudonymiser, BSN_SYSTEM)
    await net.consent_all(True)
    return net, net.pseudonymiser.pseudonym(canonical(BSN_SYSTEM, BSN))


def _others_ok(results: dict[str, FacilityResult], dead: str) -> None:
    others = {n: r.status for n, r in results.items() if n != dead}
    assert others == {"node-1": "ok", "node-2": "ok"}, others


class _DeadFacility:
    """A member listed as holding the patient whose port accepts and at once closes."""

    def __init__(self) -> None:
        self.dials = 0
        self.listener: asyncio.Server | None = None

    async def _drop(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.dials += 1
        writer.close()

    async def close(self) -> None:
        assert self.listener is not None
        self.listener.close()
        await self.listener.wait_closed()


async def _dead_facility(net: RunningNetwork, pseudonym: bytes) -> _DeadFacility:
    dead = _DeadFacility()
    dead.listener = await asyncio.start_server(dead._drop, "127.0.0.1", 0)
    port = dead.listener.sockets[0].getsockname()[1]
    await publish_as(net, _member_tls(net, "dead"), "dead", pseudonym, f"127.0.0.1:{port}")
    return dead


def _watching() -> list[asyncio.Task[object]]:
    """The background health checks running in this process (``PeerChannels._watch``)."""
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("peer-watch-")]


async def test_a_dead_facility_is_dialled_once_per_window_not_once_per_search(
    network: NetworkFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Searches only; the background checks are the next test's."""
    monkeypatch.setattr(peer_health, "FIRST_BACKOFF_S", 30.0)
    monkeypatch.setattr(peer_health, "CHECK_EVERY_S", 60.0)
    net, pseudonym = await _patient_at_both(network, tmp_path)
    dead = await _dead_facility(net, pseudonym)
    client = net.client(0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        for i in range(20):
            _, results = await collect(client, BSN, deadline_ms=2000)
            _others_ok(results, "dead")
            answer = results["dead"]
            assert answer.status == "unreachable", answer
            if i > 0:
                assert answer.elapsed_ms < 200, answer
                assert "not asked" in answer.message and "retried after" in answer.message
            await asyncio.sleep(0.1)
        # Longer than grpc's own first reconnect back-off (~1 s): without ours, grpc
        # would have dialled again in the background by now.
        assert loop.time() - started > 2.0
        assert dead.dials == 1
        # A node that stops while a peer backs off stops checking it.
        assert len(_watching()) == 1
        await net.nodes[0].stop(0)
        assert not _watching()
    finally:
        await dead.close()


async def test_a_dead_facility_nobody_asks_for_is_checked_only_until_its_window_ends(
    network: NetworkFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(peer_health, "FIRST_BACKOFF_S", 1.0)
    monkeypatch.setattr(peer_health, "CHECK_EVERY_S", 0.4)
    monkeypatch.setattr(peer_health, "BACKOFF_JITTER", 0.0)
    net, pseudonym = await _patient_at_both(network, tmp_path)
    dead = await _dead_facility(net, pseudonym)
    try:
        _, results = await collect(net.client(0), BSN)
        assert results["dead"].status == "unreachable"
        await asyncio.sleep(2.0)  # the 1 s window and twice as long again
        assert not _watching()
        assert dead.dials == 3, "one search, then a check at 0.4 s and at 0.8 s"
    finally:
        await dead.close()


async def test_a_facility_whose_front_answers_unavailable_is_asked_once_per_window(
    network: NetworkFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection works but the answer is UNAVAILABLE (e.g. a proxy before a down node)."""
    monkeypatch.setattr(peer_health, "FIRST_BACKOFF_S", 30.0)
    net, pseudonym = await _patient_at_both(network, tmp_path)
    asked = 0

    async def unavailable(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        nonlocal asked
        asked += 1
        await context.abort(grpc.StatusCode.UNAVAILABLE, "no backend")
        return b""

    front = grpc.aio.server()
    front.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "transmural.v1.Peer", {"FindDocuments": grpc.unary_unary_rpc_method_handler(unavailable)}
    )])  # fmt: skip
    tls = _member_tls(net, "front")
    address = transport.bind(front, "127.0.0.1:0", tls)
    await front.start()
    await publish_as(net, tls, "front", pseudonym, address)
    client = net.client(0)
    try:
        for _ in range(20):
            _, results = await collect(client, BSN)
            _others_ok(results, "front")
            assert results["front"].status == "unreachable"
    finally:
        await front.stop(0)
    assert asked == 1


async def test_a_hanging_facility_does_not_cost_every_search_its_deadline(
    network: NetworkFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(peer_health, "FIRST_BACKOFF_S", 2.0)
    monkeypatch.setattr(peer_health, "BACKOFF_JITTER", 0.0)
    net, pseudonym = await _patient_at_both(network, tmp_path)
    hung = await start_silent_peer(net, "FindDocuments", pseudonym)
    client = net.client(0)
    loop = asyncio.get_running_loop()
    try:
        # A deadline too short to judge a facility by: no back-off.
        _, impatient = await collect(client, BSN, deadline_ms=300)
        assert impatient["hung"].status == "timeout" and impatient["hung"].elapsed_ms >= 250
        _, first = await collect(client, BSN, deadline_ms=1000)
        assert first["hung"].status == "timeout" and first["hung"].elapsed_ms >= 950
        assert "not asked" not in first["hung"].message
        failed_at = loop.time()

        for _ in range(3):
            started = loop.time()
            _, later = await collect(client, BSN, deadline_ms=1000)
            assert loop.time() - started < 0.7, "the search waited for the hanging facility"
            _others_ok(later, "hung")
            assert later["hung"].status == "timeout" and later["hung"].elapsed_ms < 100
            assert "not asked" in later["hung"].message
            assert "retried after" in later["hung"].message

        # A fetch from it is refused at once too, naming it and when it is retried.
        started = loop.time()
        with pytest.raises(ClientError, match=r"facility hung: .*retried after"):
            await client.fetch(BSN, "hung", "any-document", io.BytesIO())
        assert loop.time() - started < 0.7

        # After the window one search probes it; another meanwhile gets the fast answer.
        await asyncio.sleep(max(0.0, failed_at + 2.05 - loop.time()))
        probe = asyncio.create_task(collect(client, BSN, deadline_ms=1000))
        await asyncio.sleep(0.3)
        _, meanwhile = await collect(net.client(0), BSN, deadline_ms=1000)
        assert "another request is retrying it now" in meanwhile["hung"].message
        assert meanwhile["hung"].elapsed_ms < 100
        _, probed = await probe
        assert probed["hung"].status == "timeout" and probed["hung"].elapsed_ms >= 950

        # The probe failed: the window doubled.
        _, after = await collect(client, BSN)
        assert "at the last 2 tries" in after["hung"].message, after["hung"]
        waits = re.search(r"in (\d+\.\d) s", after["hung"].message)
        assert waits and 3.5 <= float(waits.group(1)) <= 4.0, after["hung"].message
    finally:
        await hung.stop(0)


async def test_a_facility_silent_on_a_fetch_is_not_waited_for_again(
    network: NetworkFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Frozen mid-fetch (SIGSTOP, a hung disk): the chunk deadline is a failure of the peer."""
    monkeypatch.setattr(peer_health, "FIRST_BACKOFF_S", 5.0)  # room for a loaded machine
    net, pseudonym = await _patient_at_both(network, tmp_path, peer_deadline_s=1.0)
    hung = await start_silent_peer(net, "FetchDocument", pseudonym)
    client = net.client(0)
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        with pytest.raises(ClientError, match=r"facility hung did not answer within 1 s"):
            await client.fetch(BSN, "hung", "any-document", io.BytesIO())
        assert 0.95 <= loop.time() - started < 1.45, "not the link's own chunk deadline"

        started = loop.time()
        refused = r"facility hung: not asked: no answer before the deadline at the last try; "
        with pytest.raises(ClientError, match=refused + r"retried after .* UTC, in \d"):
            await client.fetch(BSN, "hung", "any-document", io.BytesIO())
        assert loop.time() - started < 0.3

        started = loop.time()
        _, results = await collect(client, BSN)
        assert loop.time() - started < 0.5, "the search waited for the frozen facility"
        _others_ok(results, "hung")
        assert results["hung"].status == "timeout" and results["hung"].elapsed_ms < 100
        assert "not asked" in results["hung"].message
    finally:
        await hung.stop(0)


async def test_a_facility_restarted_on_its_address_is_asked_again_within_seconds(
    network: NetworkFactory, tmp_path: Path
) -> None:
    """Real constants: the window has grown to seconds, the background check finds it back."""
    net, _ = await _patient_at_both(network, tmp_path)
    stopped = net.nodes[1]
    address = stopped.address
    await stopped.stop(0)
    client = net.client(0)
    loop = asyncio.get_running_loop()

    _, down = await collect(client, BSN)
    assert down["node-2"].status == "unreachable" and "not asked" not in down["node-2"].message
    # Searched meanwhile: the probes at each window's end fail, the window doubles.
    window_ends = await _window_after(client, tries=3, within_s=10.0)

    restarted = NodeServer(dataclasses.replace(stopped.config, listen=address))
    await restarted.start()
    net.nodes[1] = restarted
    back = loop.time()
    assert window_ends - back > 2.0, "the window must outlast what this test allows"

    async def answers() -> bool:
        _, results = await collect(client, BSN)
        return results["node-2"].status == "ok"

    await wait_for(answers, within_s=10)
    assert loop.time() - back < 2.0, "a restarted facility looked dead for its whole window"
    _, results = await collect(client, BSN)
    assert results["node-2"].status == "ok" and results["node-2"].message == ""


async def _window_after(client: GatewayClient, tries: int, within_s: float) -> float:
    """Search until node-2 has failed ``tries`` times in a row; when its window ends."""
    loop = asyncio.get_running_loop()
    until = loop.time() + within_s
    while loop.time() < until:
        _, results = await collect(client, BSN)
        assert results["node-1"].status == "ok"
        node_2 = results["node-2"]
        assert node_2.status == "unreachable", node_2
        waits = re.search(
            r"at the last (\d+) tries; retried after .*, in (\d+\.\d) s", node_2.message
        )
        if waits and int(waits.group(1)) == tries:
            return loop.time() + float(waits.group(2))
        await asyncio.sleep(0.1)
    raise AssertionError(f"node-2 did not fail {tries} times in a row in {within_s} s")
