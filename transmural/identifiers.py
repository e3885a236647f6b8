"""Canonical forms of patient identifiers.

One person's identifier written two ways ("12345672" and "012 345 672",
or the BSN under its OID and under its URI) must give one pseudonym, so
every identifier is brought to one canonical ``system|value`` before it is
hashed. Identifiers that cannot be valid are refused here, with a message
that says why, before anything is looked up or stored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from transmural.errors import InvalidIdentifier

BSN_SYSTEM = "http://fhir.nl/fhir/NamingSystem/bsn"
US_SSN_SYSTEM = "http://hl7.org/fhir/sid/us-ssn"

#: Other spellings of the same system, mapped to the one we hash.
SYSTEM_ALIASES: dict[str, str] = {
    "urn:oid:2.16.840.1.113883.2.4.6.3": BSN_SYSTEM,
    "bsn": BSN_SYSTEM,
    "urn:oid:2.16.840.1.113883.4.1": US_SSN_SYSTEM,
    "ssn": US_SSN_SYSTEM,
    "us-ssn": US_SSN_SYSTEM,
}

MAX_SYSTEM_LENGTH = 256
MAX_VALUE_LENGTH = 128
_SEPARATORS = re.compile(r"[\s.\-]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class Identifier:
    """A patient identifier in canonical form."""

    system: str
    value: str

    @property
    def token(self) -> str:
        """The FHIR token ``system|value`` that the pseudonym is taken over."""
        return f"{self.system}|{self.value}"


def canonical_system(system: str) -> str:
    """The one spelling of an identifier system that we hash."""
    system = system.strip()
    if not system:
        raise InvalidIdentifier("identifier system is empty")
    if len(system) > MAX_SYSTEM_LENGTH:
        raise InvalidIdentifier(f"identifier system is longer than {MAX_SYSTEM_LENGTH} characters")
    if _CONTROL.search(system):
        raise InvalidIdentifier("identifier system contains control characters")
    return SYSTEM_ALIASES.get(system.lower(), system)


def canonical_bsn(value: str) -> str:
    """A Dutch BSN as 9 digits that pass the 11-check.

    Spaces, dots and dashes are dropped; 8-digit input (a BSN whose leading
    zero was lost) is left-padded.
    """
    digits = _SEPARATORS.sub("", value)
    if not digits.isascii() or not digits.isdigit():
        raise InvalidIdentifier("a BSN has only digits")
    if len(digits) == 8:
        digits = "0" + digits
    if len(digits) != 9:
        raise InvalidIdentifier(
            f"a BSN has 9 digits (8 with the leading zero left out), not {len(digits)}"
        )
    weights = (9, 8, 7, 6, 5, 4, 3, 2, -1)
    if sum(int(d) * w for d, w in zip(digits, weights, strict=True)) % 11 != 0:
        raise InvalidIdentifier(f"{digits} is not a valid BSN: it fails the 11-check")
    return digits


def canonical_us_ssn(value: str) -> str:
    """A US social security number as 9 digits, separators dropped."""
    digits = _SEPARATORS.sub("", value)
    if not digits.isascii() or not digits.isdigit() or len(digits) != 9:
        raise InvalidIdentifier("a US SSN has 9 digits, written 999-99-9999 or 999999999")
    return digits


def canonical_value(system: str, value: str) -> str:
    """The value in the canonical form of its (already canonical) system."""
    if len(value) > MAX_VALUE_LENGTH:
        raise InvalidIdentifier(f"identifier value is longer than {MAX_VALUE_LENGTH} characters")
    if _CONTROL.search(value):
        raise InvalidIdentifier("identifier value contains control characters")
    value = value.strip()
    if not value:
        raise InvalidIdentifier("identifier value is empty")
    if system == BSN_SYSTEM:
        return canonical_bsn(value)
    if system == US_SSN_SYSTEM:
        return canonical_us_ssn(value)
    return value


def canonical(system: str, value: str) -> Identifier:
    """Canonical form of ``system|value``; raises InvalidIdentifier."""
    canon_system = canonical_system(system)
    return Identifier(canon_system, canonical_value(canon_system, value))


def parse_token(text: str, default_system: str) -> Identifier:
    """Parse a FHIR token ``system|value``, or a bare value in ``default_system``."""
    if len(text) > MAX_SYSTEM_LENGTH + MAX_VALUE_LENGTH + 1:
        raise InvalidIdentifier("identifier is too long")
    if "|" in text:
        system, _, value = text.rpartition("|")
        return canonical(system, value)
    return canonical(default_system, text)
