"""The load script, shortened: 10 clinicians for 5 s over the 17-patient Synthea set.

It asserts correctness under load (no failed search), not speed: speed is
``make bench``'s. It also shows that the check would catch a wrong answer,
so "no errors" means something. Reads ../shared/data; fails when missing.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tests.conftest import shared_data
from tools.bench.load import (
    Expected,
    LoadNetwork,
    LoadResult,
    check,
    drive,
    figures,
    load_network,
    measure,
    run,
    shortfall,
    summary,
)
from tools.gateway_client import FacilityResult, Holders
from tools.supervise import ProcessError

CLINICIANS = 10
SECONDS = 5.0


def _holders(*node_ids: str) -> Holders:
    return Holders(list(node_ids), [f"Facility {n}" for n in node_ids], "c0ffee")


def _result(node_id: str, status: str) -> FacilityResult:
    return FacilityResult(node_id, f"Facility {node_id}", status, 5)


def test_check_accepts_exactly_the_expected_answer() -> None:
    expected = {"node-1": "ok", "node-2": "consent-denied"}
    answer = [_result("node-2", "consent-denied"), _result("node-1", "ok")]
    assert check(expected, _holders("node-1", "node-2"), answer) is None
    assert check({}, _holders(), []) is None


@pytest.mark.parametrize(
    ("holders", "results", "says"),
    [
        (None, [], "holders"),
        (_holders("node-1"), [_result("node-1", "ok")], "listed"),
        (_holders("node-1", "node-2"), [_result("node-1", "ok")], "no answer from"),
        (_holders("node-1", "node-2"),
         [_result("node-1", "ok"), _result("node-2", "ok")], "expected consent-denied"),
        (_holders("node-1", "node-2"),
         [_result("node-1", "timeout"), _result("node-2", "consent-denied")], "answered timeout"),
        (_holders("node-1", "node-2"),
         [_result("node-1", "ok"), _result("node-1", "ok")], "unexpected answer"),
    ],
)  # fmt: skip
def test_check_describes_every_wrong_answer(
    holders: Holders | None, results: list[FacilityResult], says: str
) -> None:
    problem = check({"node-1": "ok", "node-2": "consent-denied"}, holders, results)
    assert problem is not None and says in problem


def _wrong(expected: Expected) -> Expected:
    """The opposite answer: every status flipped, or a holder that does not exist."""
    if not expected:
        return {"node-9": "ok"}
    return {n: "consent-denied" if s == "ok" else "ok" for n, s in expected.items()}


def _sabotaged(load: LoadNetwork) -> LoadNetwork:
    patients = [
        dataclasses.replace(p, expected=tuple(_wrong(e) for e in p.expected)) for p in load.patients
    ]
    return dataclasses.replace(load, patients=patients)


async def test_clinicians_search_synthea_without_errors(tmp_path: Path) -> None:
    data = shared_data("synthea-hiv-r4") / "bundles"
    async with load_network(data, CLINICIANS, tmp_path / "net", say=lambda _: None) as load:
        net = load.net
        statuses = {s for p in load.patients for e in p.expected for s in e.values()}
        # The run checks both answers a holder can give, and unlisted holders.
        assert statuses == {"ok", "consent-denied"}
        assert any(
            len(e) < len(set(net.plan.patients[p.fhir_id].nodes))
            for p in load.patients
            for e in p.expected
        ), "no facility without consent: the check never sees an unlisted holder"
        result = await measure(load, CLINICIANS, SECONDS, alone_seconds=1.0)

        # The same checks on wrong expectations: every search must count as failed.
        tally, counts, _ = await drive(_sabotaged(load), load.clinicians[:3], 0.5)
    assert result.errors == 0, result.examples
    assert len(result.per_clinician) == CLINICIANS
    assert min(result.per_clinician) >= 5, result.per_clinician
    assert result.alone_searches >= 1 and result.alone_p50_ms > 0
    assert 0 < result.p50_ms <= result.p99_ms <= result.max_ms
    assert sum(counts) >= 3 and tally.errors == sum(counts) == len(tally.latencies_ms)
    assert "expected" in tally.examples[0] or "listed" in tally.examples[0], tally.examples
    servers = [*net.nodes, net.registry]
    assert len(servers) == 4
    assert all(s is not None and s.process.poll() is not None for s in servers), "still running"


async def test_missing_data_fails_before_starting_anything(tmp_path: Path) -> None:
    with pytest.raises(ProcessError, match="not a folder"):
        await run(2, 1.0, tmp_path / "missing", workdir=tmp_path / "net", say=lambda _: None)


def _result_with(errors: int) -> LoadResult:
    return LoadResult(
        clinicians=50, seconds=60.0, elapsed_s=60.2, searches=6000, per_clinician=[120] * 50,
        p50_ms=300.0, p99_ms=900.0, max_ms=1500.0, errors=errors,
        examples=["abc12345 via node-2: node-3 answered timeout, expected ok"][:errors],
        alone_searches=300, alone_p50_ms=10.0, alone_per_s=100.0, patients=90,
    )  # fmt: skip


def test_report_has_the_headline_ratio_and_flags_any_error() -> None:
    clean, failed = _result_with(0), _result_with(3)
    tail, rate, errors = figures(clean)
    assert tail.ratio == pytest.approx(90.0) and tail.target is None
    assert rate.ratio == pytest.approx(6000 / 60.2 / 100.0)
    assert errors.met and "no errors" in summary(clean) and shortfall(clean) is None
    assert not figures(failed)[2].met
    line = shortfall(failed)
    assert line is not None and line.startswith("SHORT: 3 of 6,300 searches failed")
    assert "answered timeout" in line and "\n" not in line
