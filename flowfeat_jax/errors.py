"""The user-error type every layer raises, and the plumbing that keeps such an error to one line.

A leaf: it imports nothing of flowfeat_jax, so models, ports, data, train and the apps can all use it; `cli` turns
these errors into `prog: error: <message>` at the command line.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import sys
import tempfile
import time
from collections.abc import Iterator


class UserError(Exception):
    """A run cannot go on for a reason the user can act on (the message says which file, key or step)."""


@contextlib.contextmanager
def stderr_kept_on_success(drain_s: float = 0.0) -> Iterator[None]:
    """File descriptor 2 goes to a temporary file inside the block (C++ threads write there past Python's
    sys.stderr); what was written is passed on when the block succeeds and dropped when it raises (the error is
    then reported once, by run_guarded), after `drain_s` seconds for threads still failing to print theirs."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except BaseException:
            time.sleep(drain_s)
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        text = captured.read().decode(errors="replace")
    if text:
        sys.stderr.write(text)


def read_json_object(path: pathlib.Path, hint: str = "") -> dict:
    """A JSON object from a file the user gave or made; ValueError naming the file (and `hint`) when it is not one."""
    suffix = f"; {hint}" if hint else ""
    try:
        content = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}){suffix}") from None
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(content).__name__}{suffix}")
    return content
