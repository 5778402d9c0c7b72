"""``qemu-img check`` of a backed-up qcow2 file where it is stored, and what its answer means.

qemu-img's exit status: 0 consistent, 2 corrupt, 3 leaked clusters only (wasted space, the data is
intact), 1 the check could not run (e.g. the file is not a readable qcow2 any more), 63 the format has no
check. A backup server without qemu-img answers 127: the caller then relies on the checksums alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from drivers.commands import CommandTimeout, Runner, stderr_tail

CHECK_TIMEOUT = 3600.0
NOT_INSTALLED = 127
_STATUS = {0: "ok", 2: "corrupt", 3: "leaks", 63: "no check for this format"}


@dataclass(frozen=True)
class ImageCheck:
    """One file's check: ``ok`` when the image is consistent (leaked clusters allowed), and what was found."""

    ok: bool
    text: str
    installed: bool = True


def read_check(status: int, stdout: bytes, stderr: bytes) -> ImageCheck:
    """The meaning of ``qemu-img check --output=json``'s exit status and report."""
    if status == NOT_INSTALLED:
        return ImageCheck(True, "skipped: qemu-img not installed", installed=False)
    try:
        report = json.loads(stdout.decode("utf-8", "replace")) if stdout.strip() else {}
    except ValueError:
        report = {}
    report = report if isinstance(report, dict) else {}
    corruptions, leaks = int(report.get("corruptions") or 0), int(report.get("leaks") or 0)
    errors = int(report.get("check-errors") or 0)
    if status == 0 and not (corruptions or errors):
        return ImageCheck(True, "ok")
    if status == 3 and not (corruptions or errors):
        return ImageCheck(True, f"ok ({leaks} leaked clusters)")
    if status == 63:
        return ImageCheck(True, _STATUS[63])
    if status == 2 or corruptions:
        return ImageCheck(False, f"corrupt: {corruptions} corruptions")
    detail = stderr_tail(stderr, 300) or (f"{errors} check errors" if errors else f"exit status {status}")
    return ImageCheck(False, f"check failed: {detail}")


def alone(path: str) -> str:
    """The qcow2 file ``path`` opened without its backing file (an increment's is beside it only once a
    chain is rebuilt): what ``qemu-img`` checks is that file's own metadata."""
    return "json:" + json.dumps({"driver": "qcow2", "backing": None, "file": {"driver": "file", "filename": path}})


async def qemu_img_check(server: Runner, path: str, timeout: float = CHECK_TIMEOUT) -> ImageCheck:  # noqa: ASYNC109
    """``qemu-img check`` of the qcow2 file ``path`` on ``server`` (the file alone, not its backing chain)."""
    argv = ["qemu-img", "check", "--output=json", "--", alone(path)]
    try:
        result = await server.run(argv, timeout=timeout, check=False)
    except CommandTimeout:
        return ImageCheck(False, f"check failed: no answer within {timeout:g} s")
    return read_check(result.exit_status, result.stdout, result.stderr)
