"""Shared CLI behaviour: bad input ends in one line naming the file or key, a traceback only with --verbose."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import pathlib
import sys
from collections.abc import Callable, Iterator, Sequence


class UserError(Exception):
    """A run cannot go on for a reason the user can act on (the message says which file, key or step)."""


# Errors that mean "the input is wrong", raised by our own checks with a message that names the file or key.
USER_ERRORS = (UserError, ValueError, OSError, KeyError)


def one_line(error: BaseException) -> str:
    """The message of `error` (of the innermost exception it wraps) on one line."""
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    message = error.args[0] if isinstance(error, KeyError) and error.args else error
    return " ".join(str(message).split())


# Orbax and grain log the tracebacks of their background threads at ERROR on `absl`; after a failed save orbax's
# leftover threads log "Event loop is closed" on `concurrent.futures`, and its unawaited writes "exception was never
# retrieved" on `asyncio` (one per array on a really full disk), while the process exits.
_LIBRARY_LOGGERS = ("absl", "concurrent.futures", "asyncio")


class _DropLibraryErrors(logging.Filter):
    """Drops ERROR records of the library loggers: the failure reaches run_guarded as an exception, reported once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


def run_guarded(fn: Callable[[], object], *, prog: str, verbose: bool) -> int:
    """Runs `fn`; returns 0, or prints `prog: error: <message>` and returns 1 on a user error (re-raised if verbose)."""
    loggers, quiet = [logging.getLogger(name) for name in _LIBRARY_LOGGERS], _DropLibraryErrors()
    for logger in loggers if not verbose else ():
        logger.addFilter(quiet)
    try:
        fn()
    except USER_ERRORS as e:
        if verbose:
            raise
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 1  # the filter stays: background threads of a failed save may log it again while the process exits
    except BaseException:
        for logger in loggers:
            logger.removeFilter(quiet)
        raise
    for logger in loggers:
        logger.removeFilter(quiet)
    return 0


@contextlib.contextmanager
def stderr_kept_on_success(drain_s: float = 0.0) -> Iterator[None]:
    """File descriptor 2 goes to a temporary file inside the block (C++ threads write there past Python's
    sys.stderr); what was written is passed on when the block succeeds and dropped when it raises (the error is
    then reported once, by run_guarded), after `drain_s` seconds for threads still failing to print theirs."""
    import tempfile
    import time

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


def silence_stderr_at_exit() -> None:
    """After a reported error, points file descriptor 2 at /dev/null for the rest of the process: a failed
    checkpoint write leaves tensorstore writes in flight whose callbacks print "Event loop is closed" tracebacks
    (hundreds on a full disk) from C++ threads while the interpreter shuts down, past any Python logger or hook.
    For CLIs only, right before they exit."""
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)


def _flag_value(argv: Sequence[str], flag: str) -> str | None:
    """The value of `--flag V` or `--flag=V` in argv (the last one), else None."""
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg[len(flag) + 1 :]
    return value


def absl_flags_parser(prog: str) -> Callable[[Sequence[str]], list[str]]:
    """A `flags_parser` for absl's app.run: a bad flag, config file or `--config.a.b=v` override (unknown key, wrong
    type) ends in one line and exit status 2 instead of absl's two lines or a traceback (kept with --verbose)."""

    def parse(argv: Sequence[str]) -> list[str]:
        from absl import flags

        try:
            return flags.FLAGS(argv)
        except (flags.Error, AttributeError, KeyError, TypeError, ValueError, SyntaxError) as e:
            if "--verbose" in argv:
                raise
            message = one_line(e)
            config_file = _flag_value(argv, "--config")
            if isinstance(e, SyntaxError):  # config_flags executes the config file while parsing
                from flowfeat_jax.config import config_file_syntax_error

                message = config_file_syntax_error(config_file or e.filename, e)
            elif isinstance(e, AttributeError) and "get_config" in message:
                message = f"config file {config_file} defines no get_config() (it must return a ConfigDict)"
            elif isinstance(e, (AttributeError, KeyError)):  # ml_collections: the override names no key of the config
                key = message.split()[0].strip("'")  # the override whose last key part is the unknown one
                culprit = [a for a in argv[1:] if a.startswith("--config.") and a.split("=")[0].rsplit(".")[-1] == key]
                message = f"unknown config key in {culprit[0] if culprit else 'a --config override'}: {message}"
            print(f"{prog}: error: {message}", file=sys.stderr)
            sys.exit(2)

    return parse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help of the argparse tools: the module docstring as written, and "(default: X)" after every option that has
    a default (not after those without one, where argparse's own formatter would print "default: None")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.option_strings and "%(default)" not in text and action.default not in (None, False, argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


def hide_default_in_help(flag_name: str) -> None:
    """ml_collections' config flags print "(default: 'None')" in absl's --help when they have no default (a required
    or optional config file): drop that line."""
    from absl import flags

    flags.FLAGS[flag_name].default_as_str = None


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
