"""Shared CLI behaviour: bad input ends in one line naming the file or key, a traceback only with --verbose."""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """A run cannot go on for a reason the user can act on (the message says which file, key or step)."""


# Errors that mean "the input is wrong", raised by our own checks with a message that names the file or key.
USER_ERRORS = (UserError, ValueError, OSError, KeyError)


def run_guarded(fn: Callable[[], object], *, prog: str, verbose: bool) -> int:
    """Runs `fn`; returns 0, or prints `prog: error: <message>` and returns 1 on a user error (re-raised if verbose)."""
    try:
        fn()
    except USER_ERRORS as e:
        if verbose:
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 1
    return 0
