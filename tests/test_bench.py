"""The benchmark code itself runs (at toy sizes): ``make bench`` must not rot.

This checks that every benchmark completes and reports a ratio; it times
nothing (speed is measured by ``make bench``, never in tests). The small
pieces the report rests on (p99, goals, where the report goes) are
checked on their own.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from tools.bench.common import Figure, p99
from tools.bench.run import OUTPUT, default_output, report, unwritable

REPO = Path(__file__).resolve().parents[1]


def test_bench_quick_run_writes_a_report(tmp_path: Path) -> None:
    report = tmp_path / "BENCHMARKS.md"
    run = subprocess.run(
        [sys.executable, "-m", "tools.bench.run", "--quick", "--output", str(report)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    text = report.read_text()
    for figure in (
        "Registry Locate",
        "Index publish",
        "Document fetch",
        "Fan-out",
        "Ingest",
        "Load",
    ):
        assert figure in text, f"{figure} missing from the report"
    assert "x**" in text  # every figure has its ratio against a same-run baseline


def test_p99_is_the_nearest_rank() -> None:
    """The ceil(0.99 n)-th smallest: of 100 samples the 99th, not the maximum."""
    assert p99([float(v) for v in reversed(range(1, 101))]) == 99.0
    assert p99([float(v) for v in range(1, 201)]) == 198.0
    assert p99([float(v) for v in range(1, 102)]) == 100.0  # ceil(99.99) = 100
    assert p99([7.0]) == 7.0


def test_a_bad_output_is_refused_before_anything_runs(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "tools.bench.run", "--quick",
         "--output", str(tmp_path / "missing" / "BENCHMARKS.md")],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 2, run.stdout + run.stderr
    assert "does not exist" in run.stderr and "registry locate" not in run.stdout
    assert unwritable(tmp_path) == "is a folder"
    assert unwritable(tmp_path / "BENCHMARKS.md") is None


def test_quick_runs_do_not_write_benchmarks_md() -> None:
    assert default_output(quick=False) == OUTPUT
    quick = default_output(quick=True)
    assert quick.parent == Path(tempfile.gettempdir()) and quick.name != OUTPUT.name


def test_an_absolute_limit_is_met_only_within_it() -> None:
    """Failed searches: the goal is none at all, printed as such (not as a ratio)."""

    def failures(count: float) -> Figure:
        return Figure(
            "Load failed searches", "searches", "searches done", None,
            higher_is_better=False, values=[count], baselines=[100.0], limit=0.0,
        )  # fmt: skip

    clean, failed = failures(0.0), failures(3.0)
    assert clean.met and clean.checked and clean.goal == "<= 0 searches"
    assert not failed.met and failed.achieved == "3 searches"
    assert "| <= 0 searches | **no** |" in report([failed], 1.0, quick=True)
    reported = Figure("Fan-out", "ms", "echo", None, values=[2.0], baselines=[1.0])
    assert reported.met and not reported.checked and reported.goal == "-"
