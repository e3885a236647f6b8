# ruff: noqa: RUF001  (names in other scripts, on purpose)
"""Names shown to people: real names of every script pass, blank or hidden ones do not."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.users import Clinicians
from tests.conftest import NetworkFactory, collect
from tests.test_search import bsn_of
from transmural.names import is_printable_name, is_shown_name, with_plain_spaces


@pytest.mark.parametrize(
    "name",
    [
        "Dr. Zoë Ünal", "O'Brien-Smith", "李医生", "د. أحمد", "한국병원", "Δρ. Παπαδόπουλος",
        "मुंबई अस्पताल", "Dr. X 2",
        "مریم محمد\u200cزاده",  # Persian: ZWNJ inside the word
        "ශ්\u200dරී ජයවර්ධනපුර රෝහල",  # Sinhala: ZWJ after the virama
    ],
)  # fmt: skip
def test_real_names_are_shown_names(name: str) -> None:
    assert is_shown_name(name) and is_printable_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "", "---", "\u3164", "\u2800\u2800", "Dr.\u115fX", "Dr\u034fX", "Dr\ufe0fX",
        "Dr\u200dX", "Dr\u200cX",  # joiners between Latin letters only hide a difference
        "\u200cمریم", "مریم\u200c",  # at an edge they join nothing
        "Dr\u200bX", "Dr \u202eX", "Dr\nX", "Dr\x85X",
    ],
)  # fmt: skip
def test_blank_or_hiding_names_are_not(name: str) -> None:
    assert not is_shown_name(name)


def test_pasted_no_break_spaces_become_spaces() -> None:
    assert with_plain_spaces("Dr.\u00a0J.\u202fJansen") == "Dr. J. Jansen"
    assert is_shown_name(with_plain_spaces("Dr.\u00a0Jansen"))


async def test_a_clinician_with_a_joiner_in_their_name_is_answered(
    network: NetworkFactory, synthetic_bundles: Path
) -> None:
    """The asking node lets the name in, so every answering node must take it too."""
    net = await network(n=2)
    plan = await net.load(synthetic_bundles)
    await net.consent_all()
    fhir_id = next(p for p in sorted(plan.patients) if 1 in plan.patients[p].nodes)
    token = await Clinicians(net.nodes[0].store).add(
        "dr.mohammadzadeh", "Dr. مریم محمد\u200cزاده", "physician"
    )
    _, results = await collect(net.client(0, token=token), bsn_of(plan, fhir_id))
    assert results["node-2"].status == "ok", results["node-2"].message
