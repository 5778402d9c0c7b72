"""The ``vmsched`` executable's first lines: the warning policy, set before any library is imported.

Libraries warn at import time (asyncssh's use of cryptography's deprecated DSA classes prints ten
lines), so the filters must be in place before ``scheduler.cli`` pulls them in; this module imports
nothing of the project's at the top for that reason.

By default every Python warning goes to the ``py.warnings`` logger at DEBUG: a CLI command never
prints one; the daemon's log shows those raised once it runs when ``LOG/DEBUG_LEVEL = 3`` (the ones
raised by the imports come before any log handler and are dropped). ``VMSCHED_DEBUG=1`` or
``--debug`` anywhere on the command line shows them all on standard error, as Python would.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import TextIO

DEBUG_ENV = "VMSCHED_DEBUG"
DEBUG_FLAG = "--debug"

_log = logging.getLogger("py.warnings")


def debug_requested(argv: Sequence[str], environ: Mapping[str, str]) -> bool:
    if DEBUG_FLAG in argv:
        return True
    return environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _to_debug_log(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    _log.debug("%s:%d: %s: %s", filename, lineno, category.__name__, message)


def apply_warning_policy(debug: bool) -> None:
    if debug:
        warnings.simplefilter("default")  # every warning once per location, on standard error
        return
    warnings.showwarning = _to_debug_log


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    apply_warning_policy(debug_requested(args, os.environ))
    from scheduler.cli import main as cli_main  # after the warning policy: its imports are what warn

    return cli_main(args)


__all__ = ["DEBUG_ENV", "apply_warning_policy", "debug_requested", "main"]
