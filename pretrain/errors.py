"""The one base class of problems a user can fix.

Exceptions that derive from `UserError` carry a message that names the problem
(file, field, value or step) and the fix; `pretrain.cli.run_reporting_bad_input`
prints such a message alone, as one `error: ...` line without a traceback.
`ValueError` and `FileNotFoundError` from the library are treated the same way.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's config, data, workdir or run; the message says what to do."""


def raise_problems(problems: list[str], prefix: str = "") -> None:
    """Raises ValueError listing `problems` (one per line) when there are any: how a
    module's own rule check (`*_problems`) is enforced where the module is used,
    with the same message `pretrain.config_checks` reports before training."""
    if problems:
        raise ValueError(prefix + "\n  ".join(problems) if prefix else "; ".join(problems))
