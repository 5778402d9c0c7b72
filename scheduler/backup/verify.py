"""What a backup's verification found, from the server's answers; pure.

A backup is sound when every file recorded in the image's ``TEMPLATE/CHECKSUMS`` is on the server with that
sha256, every disk file on the server has a recorded checksum, and ``qemu-img check`` finds each disk file
consistent (leaked clusters waste space but lose nothing, so they pass). A server without qemu-img gives a
checksum-only verification, said in the message, not a failure.

The outcome is recorded on the image: ``TEMPLATE/VERIFIED`` (``YES``/``NO``), ``VERIFY_TIME`` (epoch) and
``VERIFY_MESSAGE``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from drivers.datastore.check import ImageCheck
from scheduler.model.objects.image import Image

DISK_FILE = re.compile(r"disk\.[0-9]+\.[0-9]+\Z")
NO_QEMU_IMG = "qemu-img not installed on the backup server: checksums only"
MAX_MESSAGE = 1000


@dataclass(frozen=True)
class FileVerdict:
    file: str
    sha256_ok: bool
    check: str  # qemu-img check of a disk file; "-" for other files; "missing" for a file not there
    check_ok: bool = True
    recorded: bool = True

    def to_struct(self) -> dict[str, Any]:
        return {"FILE": self.file, "SHA256_OK": self.sha256_ok, "CHECK": self.check}

    @property
    def ok(self) -> bool:
        return self.sha256_ok and self.check_ok

    @property
    def problem(self) -> str:
        if self.check == "missing":
            return "missing"
        words = [] if self.sha256_ok else ["sha256 mismatch" if self.recorded else "no checksum recorded"]
        return ", ".join(words + ([] if self.check_ok else [self.check]))


@dataclass(frozen=True)
class Verification:
    ok: bool
    message: str
    files: tuple[FileVerdict, ...] = ()

    def to_struct(self) -> dict[str, Any]:
        return {"OK": self.ok, "MESSAGE": self.message, "FILES": [f.to_struct() for f in self.files]}


def is_disk_file(name: str) -> bool:
    return DISK_FILE.match(name) is not None


def files_to_read(recorded: Mapping[str, str], present: Iterable[str]) -> list[str]:
    """The files whose sha256 is computed on the server: the recorded ones that are there, and disk files
    that are there without a recorded checksum."""
    return sorted(n for n in set(present) if n in recorded or is_disk_file(n))


def verdict(image_id: int, recorded: Mapping[str, str], present: Iterable[str], digests: Mapping[str, str],
            checks: Mapping[str, ImageCheck]) -> Verification:
    """The verification of image ``image_id`` from the recorded checksums, the file names found on the server,
    the sha256 computed there and the qemu-img check of each disk file."""
    there = set(present)
    if not recorded:
        return Verification(False, f"image {image_id} has no checksums recorded: nothing to verify against")
    files = []
    for name in sorted(set(recorded) | {n for n in there if is_disk_file(n)}):
        check = checks.get(name)
        check_text, check_ok = (check.text, check.ok) if check is not None else ("-", True)
        if name not in there:
            files.append(FileVerdict(name, False, "missing"))
        else:
            matches = name in recorded and digests.get(name) == recorded[name].lower()
            files.append(FileVerdict(name, matches, check_text, check_ok, recorded=name in recorded))
    failed = [f for f in files if not f.ok]
    if failed:
        detail = "; ".join(f"{f.file}: {f.problem}" for f in failed)
        return Verification(False, _cut(f"verification failed: {detail}"), tuple(files))
    message = f"{len(files)} files match their recorded sha256"
    disks = [checks[f.file] for f in files if f.file in checks]
    if disks and not all(c.installed for c in disks):
        message += f"; {NO_QEMU_IMG}"
    elif disks:
        message += f"; qemu-img check: {len(disks)} disk{'s' if len(disks) != 1 else ''} consistent"
    return Verification(True, message, tuple(files))


def of_chain(links: Sequence[tuple[str, Verification]]) -> Verification:
    """One verification of a chain from each link's (backup source, verification): sound when every link
    is; files named ``<source>/<file>``."""
    files = tuple(dataclasses.replace(f, file=f"{source}/{f.file}") for source, v in links for f in v.files)
    failed = [(source, v) for source, v in links if not v.ok]
    if failed:
        return Verification(False, _cut("; ".join(f"link {source}: {v.message}" for source, v in failed)), files)
    message = f"{len(links)} links, {len(files)} files match their recorded sha256"
    checked = sum(1 for f in files if f.check != "-")
    if any(NO_QEMU_IMG in v.message for _, v in links):
        message += f"; {NO_QEMU_IMG}"
    elif checked:
        message += f"; qemu-img check: {checked} disk file{'s' if checked != 1 else ''} consistent"
    return Verification(True, message, files)


def recorded_on(image: Image, verification: Verification, now: int) -> Image:
    """A copy of ``image`` carrying the outcome in its TEMPLATE."""
    template = image.template.copy()
    template.set("VERIFIED", "YES" if verification.ok else "NO")
    template.set("VERIFY_TIME", str(int(now)))
    template.set("VERIFY_MESSAGE", verification.message)
    return dataclasses.replace(image, template=template)


def _cut(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."
