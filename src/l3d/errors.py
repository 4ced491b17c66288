"""User-facing errors: one class, so the CLI can print them as one line instead of a traceback."""

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

import yaml

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


def yaml_error(path: str | Path, err: yaml.YAMLError) -> L3DError:
    """One line naming the file and the line of a YAML syntax error or of a refused tag (files
    are read with yaml.safe_load, which never builds Python objects such as `!!python/object`)."""
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}" if mark is not None else ""
    problem = " ".join(str(getattr(err, "problem", None) or err).split())  # one line
    fix = ""
    if isinstance(err, yaml.constructor.ConstructorError):
        fix = ": l3d reads plain data only, never Python objects; remove the tag"
    return L3DError(f"{path} is not valid YAML{where}: {problem}{fix}")
