"""``qemu-img info`` of a disk image on a host: its virtual size and internal snapshots.

Run through the host's command runner with ``-U`` (no lock: the image may be open in a running
guest, whose writes may make the answer slightly stale, never wrong about size or snapshots).
``parse_image_info`` is the pure part.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from drivers.commands import Runner
from scheduler.errors import DriverError

QEMU_IMG_TIMEOUT = 30.0


@dataclass(frozen=True)
class InternalSnapshot:
    """One internal snapshot inside a qcow2 image: qemu's numeric id and its tag (name)."""

    id: int
    name: str


@dataclass(frozen=True)
class ImageInfo:
    virtual_size: int  # bytes
    format: str
    snapshots: tuple[InternalSnapshot, ...] = ()

    def snapshot(self, snap_id: int) -> InternalSnapshot | None:
        return next((s for s in self.snapshots if s.id == snap_id), None)

    def named(self, name: str) -> list[InternalSnapshot]:
        return [s for s in self.snapshots if s.name == name]


def parse_image_info(text: str, path: str = "image") -> ImageInfo:
    try:
        data = json.loads(text)
        snapshots = tuple(
            InternalSnapshot(int(entry["id"]), str(entry.get("name", "")))
            for entry in data.get("snapshots", [])
            if str(entry.get("id", "")).isdigit()
        )
        return ImageInfo(int(data["virtual-size"]), str(data.get("format", "")), snapshots)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DriverError(f"qemu-img info {path}: unreadable answer ({exc})") from exc


async def image_info(runner: Runner, path: str, host: str | None = None) -> ImageInfo:
    """``qemu-img info -U --output=json PATH`` through ``runner``."""
    result = await runner.run(["qemu-img", "info", "-U", "--output=json", path], timeout=QEMU_IMG_TIMEOUT)
    return parse_image_info(result.stdout.decode(errors="replace"), f"{host}:{path}" if host else path)
