"""Test-only crash points: ``VMSCHED_CRASH_AT=name[,name...]`` makes the daemon SIGKILL itself there.

The crash-recovery tests name a point of a backup (after the guest is quiesced, after the snapshot,
while a convert or an upload runs, before the commit) or of a restore (while a disk is copied, once all are
verified, after the first disk was swapped in) and check that a restarted daemon recovers from
a death at exactly that point; no timing is involved. Unset, :func:`crash_point` does nothing. The
daemon logs loudly at start-up when the variable is set; it is never read from sched.conf.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

CRASH_ENV = "VMSCHED_CRASH_AT"
POINTS = ("quiesced", "snapshot", "convert", "converted", "upload", "uploaded",  # a backup
          "restore-fetch", "restore-fetched", "restore-swap",  # an in-place restore
          "image-restore-fetch", "image-restore-fetched",  # a restore to new images
          "flatten-merged", "flatten-switched")  # KEEP_LAST merging the oldest increments of a chain


def armed() -> set[str]:
    return {p.strip() for p in os.environ.get(CRASH_ENV, "").split(",") if p.strip()}


def crash_point(name: str) -> None:
    """SIGKILL this process when ``name`` is armed (the logs are flushed first)."""
    if name not in armed():
        return
    log.critical("crash point %r reached: killing the daemon (%s is set; test use only)", name, CRASH_ENV)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.kill(os.getpid(), signal.SIGKILL)
