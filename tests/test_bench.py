"""The benchmark code itself runs (at toy sizes): ``make bench`` must not rot.

This checks that every benchmark completes and reports a ratio; it times
nothing (speed is measured by ``make bench``, never in tests).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
