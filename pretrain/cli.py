"""Command lines of the tools that share a process with `pretrain.train`.

`pretrain.train` defines `--config` and `--workdir` on absl's global FLAGS. The
evaluation, generation and comparison commands import it (and tests import them
all together), so each keeps its flags in its own `FlagValues`, parsed here, and
reports bad input as one line instead of a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

from absl import flags
from absl import logging as absl_logging

T = TypeVar("T")
HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "--helpfull")


def parse(flag_values: flags.FlagValues, argv: Sequence[str], doc: str) -> None:
    """Parses `argv` into `flag_values`; --help prints `doc` and the flags, then exits."""
    if any(arg in HELP_FLAGS for arg in argv[1:]):
        print(doc.strip() + "\n\nflags:\n" + flag_values.get_help(include_special_flags=False))
        sys.exit(0)
    flag_values.unparse_flags()  # back to the defaults, so a second call in one process starts clean
    try:
        rest = flag_values(list(argv))
    except flags.Error as error:
        sys.exit(f"error: {error}\n(run with --help to list the flags)")
    if len(rest) > 1:
        sys.exit(f"error: unexpected arguments {rest[1:]}; flags take the form --name=value")
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax and Grain are chatty at INFO


def run_reporting_bad_input(command: Callable[[], T]) -> T:
    """Runs `command`; a missing file or a bad value exits with its message (status 1)."""
    try:
        return command()
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
