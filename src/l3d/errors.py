"""User-facing errors: one class, so the CLI can print them as one line instead of a traceback."""


class L3DError(ValueError):
    """Bad input or state that the user can fix; the message names the problem and the fix."""
