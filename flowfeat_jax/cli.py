"""Shared CLI behaviour: bad input ends in one line naming the file or key, a traceback only with --verbose."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from flowfeat_jax import errors
from flowfeat_jax.config import config_file_syntax_error


# Errors that mean "the input is wrong", raised by our own checks with a message that names the file or key.
USER_ERRORS = (errors.UserError, ValueError, OSError, KeyError)


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
        try:
            return flags.FLAGS(argv)
        except (flags.Error, AttributeError, KeyError, TypeError, ValueError, SyntaxError) as e:
            if "--verbose" in argv:
                raise
            message = one_line(e)
            config_file = _flag_value(argv, "--config")
            if isinstance(e, SyntaxError):  # config_flags executes the config file while parsing
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


def split_config_overrides(parser: argparse.ArgumentParser, argv: Sequence[str] | None):
    """(parsed arguments, the `--config.a.b=v` overrides) of an argparse tool that takes config overrides as the absl
    entry points do; any other unknown argument is argparse's usual error."""
    args, rest = parser.parse_known_args(argv)
    unknown = [arg for arg in rest if not arg.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args, rest


def apply_config_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """`config` (locked) with `--config.a.b=v` overrides parsed as main's `--config` flag parses them (ml_collections
    config_flags: the key must exist, the value keeps its type); ValueError naming the override otherwise."""
    for override in overrides:  # one at a time, so an error names its override
        argv = ["overrides", override]
        flag_values = flags.FlagValues()
        try:
            # config_flags defines a flag for each override it finds in `sys_argv`, then parses them.
            config_flags.DEFINE_config_dict("config", config, flag_values=flag_values, sys_argv=argv)
            flag_values(argv)
        except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"config override {override}: {one_line(e)}") from None
        config = flag_values["config"].value
    return config


def hide_default_in_help(flag_name: str) -> None:
    """ml_collections' config flags print "(default: 'None')" in absl's --help when they have no default (a required
    or optional config file): drop that line."""
    flags.FLAGS[flag_name].default_as_str = None
