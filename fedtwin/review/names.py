"""What a name in a reader study may be: a reader's, as they type it at login, and the
class names a study shows (and a summary carries). One form for each name, and nothing
that shows as something else: a name is printed on pages, in errors and in summaries.
"""

from __future__ import annotations

import unicodedata

MAX_NAME = 64  # a reader's name: what the login form accepts
MAX_CLASS_NAME = 100  # a class's name, printed on one line
_JOINERS = "\u200c\u200d"  # zero-width (non-)joiners: how some scripts are written


def is_name(value: object, limit: int) -> bool:
    """Whether ``value`` is a name of 1 to ``limit`` printable characters."""
    return isinstance(value, str) and 0 < len(value) <= limit and value.isprintable()


def class_names_problem(names: object) -> str | None:
    """What is wrong with ``names`` as a study's class names (None: nothing)."""
    if not isinstance(names, list) or not names:
        return "expected a list of class names"
    if not all(is_name(n, MAX_CLASS_NAME) for n in names) or len(set(names)) != len(names):
        return f"expected distinct names of 1 to {MAX_CLASS_NAME} printable characters"
    return None


def reader_name(given: str) -> str:
    """A reader's name as the study keeps it: Unicode NFC, spaces collapsed; raises
    ValueError for a name that is empty or invisible, too long, or holds a control, private
    or unassigned character, or an invisible format one (a direction override, a zero-width
    space: a name that shows as another)."""
    name = " ".join(unicodedata.normalize("NFC", given).split())
    shown = [c for c in name if unicodedata.category(c)[0] in "LNPS"]
    if not shown or len(name) > MAX_NAME:
        raise ValueError(f"A reader's name is 1 to {MAX_NAME} characters, not only spaces.")
    if any(_hidden(c) for c in name):
        raise ValueError(
            "A reader's name cannot hold control, invisible (such as direction overrides), "
            "private or unassigned characters."
        )
    return name


def _hidden(c: str) -> bool:
    kind = unicodedata.category(c)
    return kind in ("Cc", "Cs", "Co", "Cn") or (kind == "Cf" and c not in _JOINERS)
