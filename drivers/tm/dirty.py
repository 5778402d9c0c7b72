"""What changed in the qcow2 disk of a powered-off VM since one of its persistent bitmaps, and the commands
that copy just that (pure): the increments of a VM that is off, with no QEMU started for its guest.

``qemu-nbd`` exports the disk read-only with the bitmap; ``qemu-img map`` through QEMU's NBD client with
``x-dirty-bitmap`` then reports the dirty ranges (as ``"data": false``, the client's way of showing them).
The increment is a new qcow2 backed by the disk itself, filled by ``qemu-io -C`` (copy-on-read) reads of
exactly those ranges; it is then pointed at the previous link by name, as a live increment is.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

from scheduler.errors import ValidationError

READ_CHUNK = 64 << 20  # bytes per qemu-io read: each read allocates its buffer
READS_PER_CALL = 256  # qemu-io -c commands per process
# An RBD source costs each process a cluster connection (~0.15 s): more reads per process, the command line still
# far below Linux's 128 KiB for one argument (ssh hands the remote command to the shell as one)
RBD_READS_PER_CALL = 1024

# $1 socket, $2 pid file, $3 bitmap, $4 disk. qemu-nbd forks once it listens; the trap stops it again.
MAP_SCRIPT = """\
set -e
qemu-nbd --read-only --persistent --fork --socket="$1" --pid-file="$2" --format=qcow2 --bitmap="$3" -- "$4"
trap 'kill "$(cat "$2")" 2>/dev/null; rm -f "$1" "$2"' EXIT
qemu-img map --output=json --image-opts \
  "driver=nbd,server.type=unix,server.path=$1,x-dirty-bitmap=qemu:dirty-bitmap:$3"
"""


def map_argv(socket: str, pid_file: str, bitmap: str, disk: str) -> list[str]:
    return ["sh", "-c", MAP_SCRIPT, "sh", socket, pid_file, bitmap, disk]


def dirty_extents(map_json: str | bytes) -> list[tuple[int, int]]:
    """(offset, length) of each dirty range in ``qemu-img map`` output through ``x-dirty-bitmap``, adjacent
    ones joined."""
    try:
        entries = json.loads(map_json)
        ranges = [(int(e["start"]), int(e["length"])) for e in entries if not e.get("data", True)]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValidationError(f"cannot read the dirty ranges of qemu-img map: {exc}") from None
    joined: list[tuple[int, int]] = []
    for start, length in sorted(ranges):
        if joined and joined[-1][0] + joined[-1][1] == start:
            joined[-1] = (joined[-1][0], joined[-1][1] + length)
        else:
            joined.append((start, length))
    return joined


def read_commands(extents: Iterable[tuple[int, int]]) -> list[str]:
    """qemu-io ``read`` commands covering the extents, none longer than READ_CHUNK."""
    commands = []
    for start, length in extents:
        for offset in range(start, start + length, READ_CHUNK):
            commands.append(f"read -q {offset} {min(READ_CHUNK, start + length - offset)}")
    return commands


def copy_argvs(target: str, commands: Sequence[str], per_call: int = READS_PER_CALL) -> list[list[str]]:
    """``qemu-io -C`` runs on ``target`` (backed by the disk) whose reads copy the ranges into it."""
    argvs = []
    for first in range(0, len(commands), per_call):
        argv = ["qemu-io", "-C", "-f", "qcow2"]
        for command in commands[first:first + per_call]:
            argv += ["-c", command]
        argvs.append([*argv, target])
    return argvs


def dirty_bytes(extents: Iterable[tuple[int, int]]) -> int:
    return sum(length for _, length in extents)
