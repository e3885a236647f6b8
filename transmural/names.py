"""What a name shown to people may be made of: clinicians', organisations'.

A name is read by someone deciding whom to trust: the facility header of a
report, the "recorded by" of a consent, who looked at a record in the audit
export. ``str.isprintable`` already refuses control, format (zero-width,
bidirectional) and separator characters other than the space. A few
printable characters still show as nothing at all (the Hangul fillers,
the blank Braille pattern, the combining grapheme joiner, variation
selectors), so a name made of them reads as empty, and one with them inside
reads as another name. Those are refused too, and a name needs at least one
letter or digit. Joiners are allowed inside words of scripts that need
them, and no-break spaces are stored as spaces.
"""

from __future__ import annotations

import re
import unicodedata

#: Printable, yet drawn as nothing: Hangul fillers, Braille blank, combining
#: grapheme joiner, Mongolian and other variation selectors.
_BLANK_LOOKING = re.compile(
    "[\u034f\u115f\u1160\u17b4\u17b5\u180b-\u180f\u2800\u3164\ufe00-\ufe0f\uffa0"
    "\U000e0100-\U000e01ef]"
)


#: Zero-width non-joiner and joiner: part of how Persian, Sinhala and other
#: scripts are written, so allowed between two letters (or a mark and a letter)
#: of such a script; beside a Latin letter they only hide a difference.
_JOINERS = "\u200c\u200d"
#: No-break spaces that pasted names carry: shown as a space, stored as one.
_NO_BREAK_SPACES = re.compile("[\u00a0\u2007\u202f]")


def with_plain_spaces(text: str) -> str:
    """``text`` with no-break spaces as plain spaces (a name pasted from a document)."""
    return _NO_BREAK_SPACES.sub(" ", text)


def is_printable_name(text: str) -> bool:
    """``str.isprintable``, except for joiners inside a word of a script that uses them."""
    return all(c.isprintable() or joins_a_word(text, i) for i, c in enumerate(text))


def is_shown_name(text: str) -> bool:
    """True if ``text`` is printable, shows every character it has, and has a letter or digit."""
    return (
        is_printable_name(text)
        and not _BLANK_LOOKING.search(text)
        and any(unicodedata.category(c)[0] in "LN" for c in text)
    )


def joins_a_word(text: str, i: int) -> bool:
    """``text[i]`` is a joiner between two letters of a script that writes with it."""
    if text[i] not in _JOINERS or not 0 < i < len(text) - 1:
        return False
    before, after = text[i - 1], text[i + 1]
    return (
        not before.isascii()
        and not after.isascii()
        and unicodedata.category(before)[0] in "LM"
        and unicodedata.category(after)[0] == "L"
    )
