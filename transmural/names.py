"""What a name shown to people may be made of: clinicians', organisations'.

A name is read by someone deciding whom to trust: the facility header of a
report, the "recorded by" of a consent, who looked at a record in the audit
export. ``str.isprintable`` already refuses control, format (zero-width,
bidirectional) and separator characters other than the space. A few
printable characters still show as nothing at all (the Hangul fillers,
the blank Braille pattern, the combining grapheme joiner, variation
selectors), so a name made of them reads as empty, and one with them inside
reads as another name. Those are refused too, and a name needs at least one
letter or digit.
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


def is_shown_name(text: str) -> bool:
    """True if ``text`` is printable, shows every character it has, and has a letter or digit."""
    return (
        text.isprintable()
        and not _BLANK_LOOKING.search(text)
        and any(unicodedata.category(c)[0] in "LN" for c in text)
    )
