"""User-facing errors: one class, so the CLI can print them as one line instead of a traceback."""

import difflib
from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")


class L3DError(ValueError):
    """Bad input or state that the user can fix; the message names the problem and the fix."""


def lookup(table: Mapping[str, T], name: str, what: str) -> T:
    """table[name], or an L3DError naming the close matches and every valid name."""
    if name in table:
        return table[name]
    close = difflib.get_close_matches(name, list(table), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise L3DError(f"unknown {what} '{name}'{hint}; available: {', '.join(table)}")
