"""How a running backup's PROGRESS looks on a terminal, in a log, and in ``vm show``.

The daemon reports PROGRESS (in ``vmsched.vm.backupstatus`` while the run is running, and from
``vmsched.vm.backupprogress``) as a struct::

    PHASE   "capture" | "upload" | "record" (any other text is shown as it is)
    DONE    bytes done in this phase (a double: XML-RPC ints are 32-bit)
    TOTAL   bytes of this phase, 0 while not known
    DISKS   [{DISK_ID, DONE, TOTAL}, ...]
    ELAPSED seconds since the run started

Everything here is pure except :class:`ProgressView`, which only writes to the stream it is given.
The rate is measured on the daemon's ELAPSED, never on the local clock.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TextIO

_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB")
_BAR_MIN, _BAR_MAX = 10, 30
_CLEAR_TO_EOL = "\x1b[K"


@dataclass(frozen=True)
class DiskProgress:
    disk_id: int
    done: float
    total: float


@dataclass(frozen=True)
class Progress:
    phase: str
    done: float
    total: float
    disks: tuple[DiskProgress, ...] = ()
    elapsed: float = 0.0

    @classmethod
    def from_struct(cls, data: object) -> Progress | None:
        """The PROGRESS struct as the daemon sends it; None for ``{}`` (no backup runs) or no PHASE."""
        if not isinstance(data, Mapping) or not data.get("PHASE"):
            return None
        disks = data.get("DISKS")
        return cls(
            phase=str(data["PHASE"]),
            done=_number(data.get("DONE")),
            total=_number(data.get("TOTAL")),
            disks=tuple(_disk(d) for d in disks if isinstance(d, Mapping)) if isinstance(disks, list) else (),
            elapsed=_number(data.get("ELAPSED")),
        )


def _number(value: object) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0.0
    return number if number >= 0 else 0.0


def _disk(data: Mapping[str, object]) -> DiskProgress:
    return DiskProgress(int(_number(data.get("DISK_ID"))), _number(data.get("DONE")), _number(data.get("TOTAL")))


# -- units ------------------------------------------------------------------------------------------


def percent(done: float, total: float) -> int | None:
    """Whole percent, 0-100 (floored: 100 only when finished); None while the total is unknown."""
    if total <= 0:
        return None
    return max(0, min(100, int(done * 100 // total)))


def human_bytes(count: float) -> str:
    """``512 B``, ``1.5 KiB``, ``12.3 MiB``, ``123 GiB``: three significant figures at most."""
    if count < 1024:
        return f"{count:.0f} B"
    value = count
    for unit in _UNITS:
        value /= 1024
        if value < 1024 or unit == _UNITS[-1]:
            return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    """``0:07``, ``12:34``, ``1:02:03``."""
    whole = max(0, int(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def amount(done: float, total: float) -> str:
    """``1.2 GiB/3.0 GiB``, or ``1.2 GiB`` while the total is unknown."""
    return f"{human_bytes(done)}/{human_bytes(total)}" if total > 0 else human_bytes(done)


def disks_text(disks: Sequence[DiskProgress]) -> str:
    """``disk0 40% disk1 12%`` (the bytes done for a disk whose total is unknown)."""
    parts = []
    for disk in disks:
        share = percent(disk.done, disk.total)
        parts.append(
            f"disk{disk.disk_id} {share}%" if share is not None else f"disk{disk.disk_id} {human_bytes(disk.done)}"
        )
    return " ".join(parts)


# -- rate -------------------------------------------------------------------------------------------


class RateMeter:
    """Bytes per second over the current phase: from its first sample to the latest one."""

    def __init__(self) -> None:
        self._start: Progress | None = None

    def update(self, progress: Progress) -> float | None:
        start = self._start
        if start is None or start.phase != progress.phase or progress.done < start.done:
            self._start = progress
            return None
        seconds = progress.elapsed - start.elapsed
        return (progress.done - start.done) / seconds if seconds > 0 else None


def rate_text(rate: float | None) -> str:
    return f"{human_bytes(rate)}/s" if rate is not None else ""


# -- one line for a terminal ------------------------------------------------------------------------


def bar(share: int | None, width: int) -> str:
    """``[#####.....]`` of ``width`` characters in all; ``[?????]`` while the total is unknown."""
    inside = max(1, width - 2)
    if share is None:
        return "[" + "?" * inside + "]"
    filled = inside * share // 100
    return "[" + "#" * filled + "." * (inside - filled) + "]"


def bar_line(progress: Progress, width: int, rate: float | None = None) -> str:
    """The redrawn line: ``upload  42% [####......] 1.2 GiB/3.0 GiB disk0 40% 85.3 MiB/s 0:42``.

    Never longer than ``width - 1`` characters (a full last column makes some terminals wrap):
    the per-disk part goes first when space is short, then the bar, then rate and elapsed time,
    and what is left is cut.
    """
    limit = max(1, width - 1)
    share = percent(progress.done, progress.total)
    head = f"{progress.phase} {share:>3d}%" if share is not None else progress.phase
    tail = [amount(progress.done, progress.total), rate_text(rate), human_duration(progress.elapsed)]
    for per_disk in (disks_text(progress.disks) if len(progress.disks) > 1 else "", ""):
        text = " ".join(part for part in (*tail[:1], per_disk, *tail[1:]) if part)
        room = limit - len(head) - len(text) - 2
        if room >= _BAR_MIN:
            return f"{head} {bar(share, min(room, _BAR_MAX))} {text}"
    plain = f"{head} {' '.join(part for part in tail if part)}"
    return plain if len(plain) <= limit else f"{head} {tail[0]}"[:limit]


# -- plain lines for a log --------------------------------------------------------------------------


def plain_step(progress: Progress) -> tuple[str, int | None]:
    """What a log line is printed for: a new phase or a new 10 % step of it."""
    share = percent(progress.done, progress.total)
    return progress.phase, None if share is None else share // 10


def plain_line(progress: Progress, rate: float | None = None) -> str:
    """``upload 40% (1.2 GiB/3.0 GiB, disk0 40% disk1 38%, 85.3 MiB/s, 0:42 elapsed)``."""
    share = percent(progress.done, progress.total)
    head = f"{progress.phase} {share}%" if share is not None else progress.phase
    details = [
        amount(progress.done, progress.total),
        disks_text(progress.disks) if len(progress.disks) > 1 else "",
        rate_text(rate),
        f"{human_duration(progress.elapsed)} elapsed",
    ]
    return f"{head} ({', '.join(d for d in details if d)})"


# -- the ``vm show`` section ------------------------------------------------------------------------


def show_fields(progress: Progress) -> list[tuple[str, str]]:
    """Label/value pairs of the BACKUP PROGRESS section of ``vm show``."""
    share = percent(progress.done, progress.total)
    pairs = [
        ("PHASE", progress.phase),
        ("PROGRESS", f"{share}%" if share is not None else "-"),
        ("BYTES", amount(progress.done, progress.total)),
        ("ELAPSED", human_duration(progress.elapsed)),
    ]
    for disk in progress.disks:
        disk_share = percent(disk.done, disk.total)
        shown = f"{disk_share}% " if disk_share is not None else ""
        pairs.append((f"DISK {disk.disk_id}", f"{shown}{amount(disk.done, disk.total)}".strip()))
    return pairs


# -- writing it -------------------------------------------------------------------------------------


def terminal_width() -> int:
    return shutil.get_terminal_size((80, 24)).columns


class ProgressView:
    """Shows successive PROGRESS samples of one backup on ``out``.

    On a terminal one line is redrawn in place; elsewhere a plain line, prefixed with ``label``, is
    written at each new phase and each 10 % step. :meth:`finish` ends a drawn line so the final
    message starts on a line of its own.
    """

    def __init__(self, out: TextIO, label: str, tty: bool, width: Callable[[], int] | None = None) -> None:
        self._out, self._label, self._tty = out, label, tty
        self._width = width or (lambda: terminal_width())  # asked at each redraw: the window may be resized
        self._rate = RateMeter()
        self._last_step: tuple[str, int | None] | None = None
        self._drawn = False

    def show(self, progress: Progress | None) -> None:
        if progress is None:
            return
        rate = self._rate.update(progress)
        if self._tty:
            self._out.write("\r" + bar_line(progress, self._width(), rate) + _CLEAR_TO_EOL)
            self._drawn = True
        elif plain_step(progress) != self._last_step:
            self._last_step = plain_step(progress)
            self._out.write(f"{self._label}: {plain_line(progress, rate)}\n")
        self._out.flush()

    def finish(self) -> None:
        if self._drawn:
            self._out.write("\n")
            self._out.flush()
            self._drawn = False
