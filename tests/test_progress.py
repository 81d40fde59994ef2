"""The shared progress bar: plain lines (no carriage returns or escape codes) when stderr is not a terminal."""

import io

from flowfeat_jax import progress as progress_lib


class _Pipe(io.StringIO):
    def isatty(self):
        return False


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_not_a_terminal_gets_plain_lines():
    pipe = _Pipe()
    for _ in progress_lib.progress(range(4), desc="work", unit="step", file=pipe, mininterval=0):
        pass
    with progress_lib.progress(total=2, desc="inner", leave=False, position=1, file=pipe) as bar:
        bar.update(2)
    text = pipe.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert lines[0].startswith("work:   0%") and any(line.startswith("work: 100%") and "4/4" in line for line in lines)
    assert all(line.strip() for line in lines) and text.endswith("\n")


def test_not_a_terminal_prints_at_most_one_line_per_interval():
    pipe = _Pipe()
    for _ in progress_lib.progress(range(10000), desc="fast", file=pipe):
        pass
    assert len(pipe.getvalue().splitlines()) <= 3  # the first, at most one in between, the last


def test_terminal_keeps_the_redrawn_bar():
    terminal = _Terminal()
    for _ in progress_lib.progress(range(3), desc="tty", file=terminal, mininterval=0):
        pass
    assert "\r" in terminal.getvalue()
