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
    cli,
    drive,
    figures,
    load_network,
    measure,
    run,
    shortfall,
    summary,
)
from tools.gateway_client import Document, FacilityResult, Holders
from tools.supervise import ProcessError

CLINICIANS = 10
SECONDS = 5.0


#: What the two facilities of the checker's tests hold for the patient.
HELD = {"node-1": ["doc-a", "doc-b"], "node-2": ["doc-c"]}
EXPECTED = {"node-1": "ok", "node-2": "consent-denied"}


def _holders(*node_ids: str) -> Holders:
    return Holders(list(node_ids), [f"Facility {n}" for n in node_ids], "c0ffee")


def _result(node_id: str, status: str, documents: list[str] | None = None) -> FacilityResult:
    """An answer listing ``documents``; by default what HELD says a right answer lists."""
    if documents is None:
        documents = HELD[node_id] if status == "ok" else []
    listed = [Document(d, "Note", "", "", "text/plain", 1, "", "", "") for d in documents]
    return FacilityResult(node_id, f"Facility {node_id}", status, 5, documents=listed)


def test_check_accepts_exactly_the_expected_answer() -> None:
    answer = [_result("node-2", "consent-denied"), _result("node-1", "ok", ["doc-b", "doc-a"])]
    assert check(EXPECTED, HELD, _holders("node-1", "node-2"), answer) is None
    assert check({}, {}, _holders(), []) is None


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
        # Right statuses, wrong documents: an ok that lists nothing, too little or others.
        (_holders("node-1", "node-2"),
         [_result("node-1", "ok", []), _result("node-2", "consent-denied")],
         "node-1 answered ok with 0 documents, expected its 2"),
        (_holders("node-1", "node-2"),
         [_result("node-1", "ok", ["doc-a"]), _result("node-2", "consent-denied")],
         "with 1 documents, expected its 2"),
        (_holders("node-1", "node-2"),
         [_result("node-1", "ok", ["doc-a", "doc-c"]), _result("node-2", "consent-denied")],
         "(other ids)"),
        (_holders("node-1", "node-2"),
         [_result("node-1", "ok"), _result("node-2", "consent-denied", ["doc-c"])],
         "node-2 answered consent-denied with 1 documents, expected none"),
    ],
)  # fmt: skip
def test_check_describes_every_wrong_answer(
    holders: Holders | None, results: list[FacilityResult], says: str
) -> None:
    problem = check(EXPECTED, HELD, holders, results)
    assert problem is not None and says in problem, problem


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


def _documents_forgotten(load: LoadNetwork, asker: int) -> LoadNetwork:
    """Right statuses, but every facility said to hold nothing: only documents are wrong.

    Only patients some facility answers ``asker`` with ``ok`` and documents:
    every search of theirs must fail, on the documents alone.
    """
    patients = [
        dataclasses.replace(p, documents={})
        for p in load.patients
        if any(s == "ok" and p.documents.get(n) for n, s in p.expected[asker].items())
    ]
    assert patients, "no patient with documents to forget"
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
        assert all(
            set(p.documents) == {net.configs[i].node_id for i in net.plan.patients[p.fhir_id].nodes}
            for p in load.patients
        ), "the expected documents are not read from every holder's store"
        result = await measure(load, CLINICIANS, SECONDS, alone_seconds=1.0)

        # The same checks on wrong expectations: every search must count as failed.
        tally, counts, _ = await drive(_sabotaged(load), load.clinicians[:3], 0.5)
        asker = load.clinicians[0]
        forgot, _, _ = await drive(_documents_forgotten(load, asker.node), [asker], 0.5)
    assert result.errors == 0, result.examples
    assert len(result.per_clinician) == CLINICIANS
    assert min(result.per_clinician) >= 5, result.per_clinician
    assert result.alone_searches >= 1 and result.alone_p50_ms > 0
    assert 0 < result.p50_ms <= result.p99_ms <= result.max_ms
    assert sum(counts) >= 3 and tally.errors == sum(counts) == len(tally.latencies_ms)
    assert "expected" in tally.examples[0] or "listed" in tally.examples[0], tally.examples
    assert forgot.latencies_ms and forgot.errors == len(forgot.latencies_ms), forgot.examples
    assert all("documents" in example for example in forgot.examples), forgot.examples
    servers = [*net.nodes, net.registry]
    assert len(servers) == 4
    assert all(s is not None and s.process.poll() is not None for s in servers), "still running"


async def test_missing_data_fails_before_starting_anything(tmp_path: Path) -> None:
    with pytest.raises(ProcessError, match="not a folder"):
        await run(2, 1.0, tmp_path / "missing", workdir=tmp_path / "net", say=lambda _: None)
    assert not (tmp_path / "net").exists(), "a network was made for a run that cannot start"


@pytest.mark.parametrize(
    ("option", "says"),
    [
        (["--seconds", "nan"], "--seconds: must be a number of seconds above 0"),
        (["--seconds", "inf"], "at most 3600"),
        (["--seconds", "0"], "above 0"),
        (["--alone-seconds", "-1"], "--alone-seconds: must be"),
        (["--clinicians", "0"], "--clinicians: must be a whole number above 0 and at most 1000"),
        (["--clinicians", "1.5"], "whole number"),
        (["--clinicians", "1001"], "at most 1000"),
        (["--data", "/nonexistent/bundles"], "--data: '/nonexistent/bundles' is not a folder"),
    ],
)
def test_command_line_refuses_unbounded_or_missing_input(
    option: list[str], says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused by argparse (exit 2) before any network is made: nan would do nothing, inf run on."""
    data = ["--data", str(tmp_path)]  # a folder that exists, unless the case says otherwise
    with pytest.raises(SystemExit) as stopped:
        cli([*data, "--workdir", str(tmp_path / "net"), *option])
    assert stopped.value.code == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "net").exists()


def _result_with(errors: int) -> LoadResult:
    return LoadResult(
        clinicians=50, seconds=60.0, elapsed_s=60.2, searches=6000, per_clinician=[120] * 50,
        p50_ms=300.0, p99_ms=900.0, max_ms=1500.0, errors=errors,
        examples=["abc12345 via node-2: node-3 answered timeout, expected ok"][:errors],
        alone_searches=300, alone_p50_ms=10.0, alone_p99_ms=30.0, alone_per_s=100.0,
        patients=90,
    )  # fmt: skip


def test_report_has_the_headline_ratio_and_flags_any_error() -> None:
    clean, failed = _result_with(0), _result_with(3)
    tail, rate, errors = figures(clean)
    # p99 under load against p99 alone, the same percentile measured the same way.
    assert tail.ratio == pytest.approx(30.0) and tail.target is None
    assert tail.baseline_name == "search p99, one clinician alone"
    assert rate.ratio == pytest.approx(6000 / 60.2 / 100.0)
    assert all(f.notes.startswith("one run of 60 s") for f in (tail, rate, errors))
    assert errors.met and "no errors" in summary(clean) and shortfall(clean) is None
    assert errors.goal == "<= 0 searches"
    assert not figures(failed)[2].met and figures(failed)[2].achieved == "3 searches"
    line = shortfall(failed)
    assert line is not None and line.startswith("SHORT: 3 of 6,300 searches failed")
    assert "answered timeout" in line and "\n" not in line
