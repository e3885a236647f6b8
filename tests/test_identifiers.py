"""Canonical identifiers and pseudonyms: one person, one pseudonym."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from transmural.errors import ConfigError, InvalidIdentifier
from transmural.identifiers import (
    BSN_SYSTEM,
    US_SSN_SYSTEM,
    canonical,
    canonical_bsn,
    parse_token,
)
from transmural.pseudonym import Pseudonymiser

KEY = bytes(range(32))


def valid_bsns() -> st.SearchStrategy[str]:
    """9-digit strings that pass the 11-check."""

    def complete(first8: str) -> str | None:
        total = sum(int(d) * w for d, w in zip(first8, range(9, 1, -1), strict=True))
        last = total % 11
        return first8 + str(last) if last < 10 else None

    return (
        st.text(alphabet="0123456789", min_size=8, max_size=8)
        .map(complete)
        .filter(lambda v: v is not None)  # type: ignore[arg-type]
    )  # type: ignore[return-value]


def test_bsn_eleven_check() -> None:
    assert canonical_bsn("111222333") == "111222333"
    with pytest.raises(InvalidIdentifier, match="11-check"):
        canonical_bsn("111222334")


def test_bsn_eight_digits_are_left_padded() -> None:
    # 012345672 passes the 11-check; written without its leading zero.
    assert canonical_bsn("12345672") == "012345672"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("1234567", "9 digits"),
        ("1234567890", "9 digits"),
        ("12345678a", "only digits"),
        ("", "empty"),
    ],
)
def test_bsn_refused_with_reason(value: str, reason: str) -> None:
    with pytest.raises(InvalidIdentifier, match=reason):
        canonical(BSN_SYSTEM, value)


def test_bsn_oid_and_uri_are_one_system() -> None:
    a = canonical("urn:oid:2.16.840.1.113883.2.4.6.3", "111 222 333")
    b = canonical(BSN_SYSTEM, "111222333")
    assert a == b


def test_us_ssn_dashes_dropped() -> None:
    assert canonical(US_SSN_SYSTEM, "999-12-3456").value == "999123456"
    with pytest.raises(InvalidIdentifier, match="9 digits"):
        canonical(US_SSN_SYSTEM, "999-12-345")


def test_parse_token_bare_value_uses_default_system() -> None:
    assert parse_token("111222333", BSN_SYSTEM) == canonical(BSN_SYSTEM, "111222333")
    assert parse_token(f"{US_SSN_SYSTEM}|999-12-3456", BSN_SYSTEM).system == US_SSN_SYSTEM


def test_control_characters_and_huge_values_refused() -> None:
    with pytest.raises(InvalidIdentifier, match="control"):
        canonical("urn:x", "abc\x00def")
    with pytest.raises(InvalidIdentifier, match="longer"):
        canonical("urn:x", "9" * 10_000)


@given(valid_bsns(), st.sampled_from(["", " ", ".", "-"]))
def test_one_person_one_pseudonym(bsn: str, separator: str) -> None:
    pseudonymiser = Pseudonymiser(KEY)
    written = separator.join([bsn[:4], bsn[4:6], bsn[6:]])
    if bsn.startswith("0"):
        written = written[1:].lstrip(separator)  # the leading zero lost
    a = pseudonymiser.pseudonym(canonical("urn:oid:2.16.840.1.113883.2.4.6.3", written))
    b = pseudonymiser.pseudonym(canonical(BSN_SYSTEM, bsn))
    assert a == b
    assert len(a) == 32


@given(valid_bsns(), valid_bsns())
def test_different_people_different_pseudonyms(a: str, b: str) -> None:
    pseudonymiser = Pseudonymiser(KEY)
    same = pseudonymiser.pseudonym(canonical(BSN_SYSTEM, a)) == pseudonymiser.pseudonym(
        canonical(BSN_SYSTEM, b)
    )
    assert same == (a == b)


def test_pseudonym_depends_on_network_key() -> None:
    identifier = canonical(BSN_SYSTEM, "111222333")
    other = Pseudonymiser(bytes(32)).pseudonym(identifier)
    assert Pseudonymiser(KEY).pseudonym(identifier) != other


def test_short_network_key_refused() -> None:
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        Pseudonymiser(b"short")
