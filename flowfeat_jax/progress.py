"""The one progress bar of every loop: tqdm on a terminal, a plain line every few seconds in a log file or pipe.

tqdm redraws its bar with carriage returns (and cursor moves for nested bars); in a log file, a pipe or CI output
those pile up as one endless line of escape codes. When stderr is not a terminal the bar is printed as ordinary
lines instead, at most one per `LOG_INTERVAL_S` seconds (plus the first and the last).
"""

from __future__ import annotations

import re
import sys
from typing import Any, TextIO

from tqdm import tqdm

LOG_INTERVAL_S = 30.0
_CONTROL = re.compile(r"\x1b\[[0-9;]*[A-Za-z]|\r")  # ANSI cursor moves / clears, and carriage returns


class _LineWriter:
    """A file for tqdm that turns each redraw into one plain line (control codes and padding dropped)."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        for line in _CONTROL.sub("\n", text).split("\n"):
            if line.strip():
                self.stream.write(line.rstrip() + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable=None, **kwargs: Any) -> tqdm:
    """`tqdm(iterable, **kwargs)`; when stderr is not a terminal: ASCII lines every LOG_INTERVAL_S seconds."""
    stream = kwargs.pop("file", None) or sys.stderr
    if not stream.isatty():
        kwargs = {"mininterval": LOG_INTERVAL_S, "maxinterval": LOG_INTERVAL_S, "ascii": True, "ncols": 100,
                  "dynamic_ncols": False, **kwargs, "file": _LineWriter(stream)}
    else:
        kwargs["file"] = stream
    return tqdm(iterable, **kwargs)
