"""Command lines: every tool's flags are parsed here, and every mistake is one line.

Each tool (`pretrain.train`, `.evaluate`, `.generate`, `.compare`, `.inspect_data`)
defines its flags inside its own `main`, on a `FlagValues` of its own, as the Flax
examples' `main.py` does: importing a tool defines no flag, so every module imports
as a plain library. This module is the one home of the rules for what a user typed:

- flags are parsed by `parse`; `--help` prints the tool's docstring and flags;
- a config file flag (`--config=configs/pretrain.py:objective=mlm --config.x=...`,
  `ml_collections.config_flags`) is defined by `define_config`; a missing file, a bad
  variant, an override of a field the config does not have and a value of the wrong
  type are each diagnosed here, with the field, the valid choices and a fix;
- `run_reporting_bad_input` runs the command and turns a user error (`USER_ERRORS`)
  into one `error: ...` line and exit status 1, never a traceback
  (PRETRAIN_TRACEBACK=1 shows the traceback).
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import os
import re
import sys
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from pretrain.errors import UserError

T = TypeVar("T")
HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "--helpfull")
TRACEBACK_VARIABLE = "PRETRAIN_TRACEBACK"


class UsageError(ValueError):
    """A command line the tool cannot run; the message names the flag and the fix."""


def _exit(message: str) -> None:
    """Ends the process with `error: message` and status 1."""
    sys.exit(f"error: {str(message).strip()}")


def parse(flag_values: flags.FlagValues, argv: Sequence[str], doc: str) -> None:
    """Parses `argv` into `flag_values`; --help prints `doc` and the flags, then exits.

    A bad flag ends the process with one line naming it."""
    if any(arg in HELP_FLAGS for arg in argv[1:]):
        print(doc.strip() + "\n\nflags:\n" + flag_values.get_help(include_special_flags=False))
        sys.exit(0)
    flag_values.unparse_flags()  # back to the defaults, so a second call in one process starts clean
    try:
        rest = flag_values(list(argv))
    except UsageError as error:
        _exit(str(error))
    except Exception as error:  # noqa: BLE001 — absl's flags.Error, or what a config file flag raises
        _exit(_flag_error(flag_values, argv, error))
    if len(rest) > 1:
        _exit(f"unexpected arguments {rest[1:]}; flags take the form --name=value (run with --help to list them)")
    setup_logging()


def _flag_error(flag_values: flags.FlagValues, argv: Sequence[str], error: Exception) -> str:
    """One line for an error while parsing flags, diagnosed against the config when it concerns one."""
    for name in flag_values:
        if _is_config_flag(flag_values[name]):
            diagnosis = diagnose_config_arguments(argv, name, _config_default(flag_values[name]))
            if diagnosis:
                return diagnosis
    return f"{_last_line(error)} (run with --help to list the flags)"


def _is_config_flag(flag: flags.Flag) -> bool:
    """Whether `flag` is an ml_collections config file flag (`define_config`)."""
    return getattr(flag.parser, "flag_type", lambda: "")() == "config object"


def _config_default(flag: flags.Flag) -> str | None:
    """The config file argument a config flag was defined with (its default)."""
    default = flag.default_as_str
    return default.strip("'\"") if isinstance(default, str) else None


def _last_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def define_config(flag_values: flags.FlagValues, argv: Sequence[str], default: str, help_text: str,
                  name: str = "config") -> flags.FlagHolder:
    """`--config=<file>[:variants]` plus `--config.<field>=value` overrides (ml_collections).

    ml_collections reads the overrides while the flag is being defined; any
    mistake there (unknown field, bad value, bad file or variant) ends the
    process with one line naming the field and the valid choices."""
    try:
        return config_flags.DEFINE_config_file(name, default, help_text, flag_values=flag_values,
                                               sys_argv=list(argv))
    except Exception as error:  # noqa: BLE001 — whatever ml_collections raises, the user typed it
        _exit(diagnose_config_arguments(argv, name, default) or _last_line(error))


def config_value(holder: flags.FlagHolder, argv: Sequence[str]) -> Any:
    """The parsed config (overrides applied); a mistake ml_collections reports only now
    (a config file that could not be loaded) is raised as one `UsageError` line."""
    try:
        value = holder.value
        getattr(value, "to_dict")  # a config that failed to load raises on any attribute
        return value
    except Exception as error:  # noqa: BLE001
        default = _config_default(holder._flagvalues[holder.name])  # noqa: SLF001 — absl keeps it there
        raise UsageError(diagnose_config_arguments(argv, holder.name, default) or _last_line(error)) from None


# -- diagnosis of config arguments ------------------------------------------------------


def diagnose_config_arguments(argv: Sequence[str], name: str = "config", default: str | None = None) -> str | None:
    """What is wrong with `--<name>=...` and `--<name>.<field>=...` in `argv`, in one
    line, or None when nothing is found. It loads the config file itself, so it can
    say which file, variant, field or value is at fault."""
    spec = default if isinstance(default, str) else None
    for arg in argv[1:]:
        match = re.match(rf"^-{{1,2}}{re.escape(name)}=(.*)$", arg)
        if match:
            spec = match.group(1)
    if spec is None:
        return None
    path, _, variants = spec.partition(":")
    if not os.path.isfile(path):
        return (f"--{name}={spec}: there is no config file {path!r} (looked from {os.getcwd()}); give the path "
                "of one, e.g. --config=configs/pretrain.py from the repository root")
    try:
        module = _load_module(path)
        config = module.get_config(variants) if variants else module.get_config()
    except Exception as error:  # noqa: BLE001 — the config file's own message
        return f"--{name}={spec}: {_last_line(error)}"
    variant_names = tuple(getattr(module, "DEFAULT_VARIANTS", {}) or ())
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    for arg in argv[1:]:
        match = re.match(rf"^-{{1,2}}(no)?{re.escape(name)}\.([^=]+)(=(.*))?$", arg)
        if match:
            problem = _override_problem(config, name, path, match.group(2), match.group(4), variant_names)
            if problem:
                return problem
    return None


def _load_module(path: str) -> Any:
    module_spec = importlib.util.spec_from_file_location(f"_diagnosed_config_{uuid.uuid4().hex}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _override_problem(config: Any, name: str, path: str, field: str, value: str | None,
                      variant_names: tuple[str, ...]) -> str | None:
    """The problem with `--<name>.<field>=<value>`: a field the config does not have,
    or a value its type cannot take."""
    node, walked = config, name
    for key in field.split("."):
        if not isinstance(node, Mapping) or key not in node:
            if not isinstance(node, Mapping):
                return (f"--{name}.{field}: {walked} is a value ({node!r}), not a group of fields; "
                        f"write --{walked}=<value>")
            choices = sorted(node)
            close = difflib.get_close_matches(key, choices, n=1)
            hint = f"did you mean {walked}.{close[0]}? " if close else ""
            if walked == name and key in variant_names:
                hint = (f"{key} is a variant of {path}, not a field: write --{name}={path}:...,{key}=<value>. "
                        + hint)
            return (f"--{name}.{field}: {walked} has no field {key!r}; {hint}"
                    f"its fields: {', '.join(choices)}")
        node, walked = node[key], f"{walked}.{key}"
    if isinstance(node, Mapping):
        if value is None:
            return None
        return (f"--{name}.{field}={value}: {walked} is a group of fields ({', '.join(sorted(node))}); set one "
                f"of them, e.g. --{walked}.{sorted(node)[0]}=...")
    if value is None:
        return None
    expected = type(node)
    if expected is bool:
        ok = value.lower() in ("true", "false", "1", "0")
    elif expected in (int, float):
        try:
            expected(value) if expected is float else int(value)
            ok = True
        except ValueError:
            ok = False
    else:
        ok = True
    if not ok:
        article = "an" if expected.__name__[0] in "aeiou" else "a"
        return (f"--{name}.{field}={value}: {walked} takes {article} {expected.__name__} (it is {node!r} now); "
                f"give one, e.g. --{name}.{field}={node!r}")
    return None


def setup_logging() -> None:
    """The project's log lines (`pretrain.*` at INFO) on stderr as `LEVEL logger: message`;
    absl's and the libraries' chatter at WARNING and above only."""
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax and Grain are chatty at INFO
    logger = logging.getLogger("pretrain")
    logger.setLevel(logging.INFO)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False


# -- running a command ------------------------------------------------------------------

# Problems with the user's config, data, workdir or run, each raised with a message
# that names it and the fix; `run_reporting_bad_input` prints that message alone.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, ValueError, FileNotFoundError, NotADirectoryError)


def run_reporting_bad_input(command: Callable[[], T]) -> T:
    """Runs `command`; a user error ends the process with its one message (status 1).
    PRETRAIN_TRACEBACK=1 shows the traceback instead."""
    try:
        return command()
    except USER_ERRORS as error:
        if os.environ.get(TRACEBACK_VARIABLE):
            raise
        _exit(str(error))
