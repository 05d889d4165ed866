"""The command line's error surface: a project error -> one line and an exit code.

Project errors are the exception classes below, defined in ``peft_jax`` modules (matched
by name along the exception's class hierarchy, so the most specific one wins and this
module imports nothing heavy). Anything else is a bug and keeps its traceback.

The codes are listed in :mod:`peft_jax.cli` (and the README).
"""

from __future__ import annotations

import sys
from typing import Optional

EXIT_CODES = {
    "ConfigError": 2, "SweepError": 2, "LaunchError": 2, "ReportError": 2, "LibraryError": 2,
    "DataError": 3,
    "CheckpointError": 4, "RopeConfigError": 4,
    "CheckpointMismatch": 5, "DeltaMismatch": 5,
    "NonFiniteLoss": 6,
    "WorkdirLocked": 7,
}
EXIT_OSERROR = 74


def exit_code(exc: BaseException) -> Optional[int]:
    """The exit code of a project error (or an OSError); None for anything else."""
    for cls in type(exc).__mro__:
        if cls.__module__.split(".")[0] == "peft_jax" and cls.__name__ in EXIT_CODES:
            return EXIT_CODES[cls.__name__]
    return EXIT_OSERROR if isinstance(exc, OSError) else None


def one_line(exc: BaseException) -> str:
    """The message on one line (whitespace runs, newlines included, become one space)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def print_error(exc: BaseException, prefix: str = "") -> None:
    """``error: [prefix]<one line>`` on stderr."""
    print(f"error: {prefix}{one_line(exc)}", file=sys.stderr, flush=True)
