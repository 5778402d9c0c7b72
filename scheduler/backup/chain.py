"""Increment chains (spec §6): which link a MODE=INCREMENT backup takes next, and the chain image it is
recorded in; pure.

A chain is one BACKUP image whose ``BACKUP_INCREMENTS`` list its links: increment 0 is the full base, each
later one holds what changed since the one before. The VM's ``INCREMENTAL_BACKUP_ID`` names the image and
``LAST_INCREMENT_ID`` its last link (§6.2). The next backup continues that chain when everything still
fits; otherwise a new chain starts with a full base, in a new image, and the reason is kept on it
(``TEMPLATE/NEW_CHAIN_REASON``) and in the run's message.

Each link is its own backup on the datastore (an rsync/fs directory, a restic snapshot: the increment's
SOURCE) holding ``disk.<disk_id>.<n>``, a qcow2 whose backing file is named ``disk.<disk_id>.<n-1>``
(relative, no directory), plus the ``vm.xml`` and ``domain.xml`` of that moment. Their sha256 are in the
image's ``TEMPLATE/CHECKSUMS`` with the link's ``INCREMENT_ID``; a disk file's also has its
``VIRTUAL_SIZE`` (bytes), which later links must keep.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scheduler.backup.urls import increment_of, url_vectors
from scheduler.errors import ActionError
from scheduler.model import backup_config as backups
from scheduler.model.objects.datastore import Datastore
from scheduler.model.objects.image import FULL, INCREMENT, NEW_CHAIN_CAUSE, NEW_CHAIN_REASON, Image, Increment
from scheduler.model.objects.states import ImageType
from scheduler.model.objects.vm import Vm
from scheduler.model.template import Vector

REASON = NEW_CHAIN_REASON
CAUSE = NEW_CHAIN_CAUSE
FLATTEN = "FLATTEN"  # on the image while its oldest links are merged (scheduler.backup.flatten)
CHECKSUMS = "CHECKSUMS"
URLS = "BACKUP_URL"


@dataclass(frozen=True)
class Link:
    """The link a backup takes: increment ``increment_id`` of ``image`` (None: the base of a new chain)."""

    increment_id: int
    image: Image | None = None
    reason: str = ""  # why a new chain starts although the VM had one
    cause: str = ""  # the reason's short code (see NEW_CHAIN_CAUSE)

    @property
    def sizes(self) -> dict[int, int]:
        """disk_id -> virtual bytes at the chain's base (what the increment's disks must still be)."""
        return {} if self.image is None else base_sizes(self.image)


def new_chain(reason: str = "", cause: str = "") -> Link:
    return Link(0, None, reason, cause)


def next_link(vm: Vm, images: Mapping[int, Image], disk_ids: Sequence[int], *, reset: bool) -> Link | None:
    """The link the VM's next backup takes; None in MODE=FULL (spec §6.2, §6.6)."""
    config = vm.backup_config
    if backups.mode(config) != "INCREMENT":
        return None
    if backups.active_flatten(config):
        raise ActionError(f"VM {vm.id}: the increments of its chain are being merged (ACTIVE_FLATTEN); "
                          "the backup waits for that", retryable=True)
    image_id, last = backups.incremental_backup_id(config), backups.last_increment_id(config)
    if image_id == backups.NO_CHAIN or last == backups.NO_CHAIN:
        return new_chain()
    if reset:
        return new_chain(f"a reset was asked for: chain image {image_id} is left as it is", "reset")
    image = images.get(image_id)
    if image is None or image.type != ImageType.BACKUP:
        return new_chain(f"chain image {image_id} is gone", "image_gone")
    ids = [increment.id for increment in image.increments]
    if not ids or max(ids) != last:
        return new_chain(f"chain image {image_id} ends at increment {max(ids) if ids else 'none'}, the VM's "
                         f"LAST_INCREMENT_ID is {last}", "pointers")
    if sorted(disk_ids) != sorted(image.backup_disk_ids):
        return new_chain(f"the disks backed up changed (chain image {image_id} has "
                         f"{_ids(image.backup_disk_ids)}, the VM now backs up {_ids(disk_ids)})", "disks_changed")
    return Link(last + 1, image)


def base_sizes(image: Image) -> dict[int, int]:
    """disk_id -> VIRTUAL_SIZE of each disk file of the chain's first link."""
    return virtual_sizes(image, min((increment.id for increment in image.increments), default=0))


def virtual_sizes(image: Image, increment_id: int) -> dict[int, int]:
    """disk_id -> VIRTUAL_SIZE (bytes) recorded for each disk file of link ``increment_id`` (0 for a full
    backup); a disk recorded without one is missing."""
    sizes = {}
    for vector in image.template.vectors(CHECKSUMS):
        name, size = vector.get("FILE") or "", (vector.get("VIRTUAL_SIZE") or "").strip()
        if increment_of(vector) == increment_id and name.startswith("disk.") and size.isdigit():
            sizes[int(name.split(".")[1])] = int(size)
    return sizes


def checksum_vectors(increment_id: int, sha256: Mapping[str, str], virtual_sizes: Mapping[str, int]) -> list[Vector]:
    """One CHECKSUMS vector per file of a link: FILE, SHA256, INCREMENT_ID, and a disk file's VIRTUAL_SIZE."""
    vectors = []
    for name, digest in sorted(sha256.items()):
        fields = [("FILE", name), ("SHA256", digest), ("INCREMENT_ID", str(increment_id))]
        if name in virtual_sizes:
            fields.append(("VIRTUAL_SIZE", str(virtual_sizes[name])))
        vectors.append(Vector(fields))
    return vectors


def start_chain(image: Image, datastore: Datastore, link: Link, size_mb: int, virtual_sizes: Mapping[str, int],
                now: float) -> Image:
    """The image of a new chain, from the image a full backup would have recorded (its CHECKSUMS replaced
    by the link's)."""
    template = image.template.copy()
    sha256 = {str(v.get("FILE")): str(v.get("SHA256")) for v in template.vectors(CHECKSUMS)}
    template.remove(CHECKSUMS)
    for vector in checksum_vectors(0, sha256, virtual_sizes):
        template.add(CHECKSUMS, vector)
    if link.reason:
        template.set(REASON, link.reason)
        template.set(CAUSE, link.cause or "other")
    base = Increment(id=0, type=FULL, parent_id=-1, source=image.source, size=size_mb, date=int(now))
    chain = dataclasses.replace(image, template=template, increments=[base], size=size_mb)
    return _with_urls(chain, datastore)


def add_link(image: Image, datastore: Datastore, increment_id: int, backup_id: str, size_mb: int,
             sha256: Mapping[str, str], virtual_sizes: Mapping[str, int], now: float) -> Image:
    """A copy of the chain image with increment ``increment_id`` (backup ``backup_id``) as its last link."""
    last = max(increment.id for increment in image.increments)
    if increment_id != last + 1:
        raise ActionError(f"chain image {image.id} ends at increment {last}: increment {increment_id} does not "
                          "follow it")
    link = Increment(id=increment_id, type=INCREMENT, parent_id=last, source=backup_id, size=size_mb, date=int(now))
    template = image.template.copy()
    for vector in checksum_vectors(increment_id, sha256, virtual_sizes):
        template.add(CHECKSUMS, vector)
    increments = [*image.increments, link]
    chain = dataclasses.replace(image, template=template, increments=increments, modtime=int(now),
                                size=sum(increment.size for increment in increments))
    return _with_urls(chain, datastore)


def _with_urls(image: Image, datastore: Datastore) -> Image:
    """The image with its BACKUP_URL vectors (one per disk, at the last increment) made anew."""
    template = image.template.copy()
    template.remove(URLS)
    image = dataclasses.replace(image, template=template)
    for vector in url_vectors(image, datastore):
        template.add(URLS, vector)
    return image


def _ids(ids: Sequence[int]) -> str:
    return ", ".join(map(str, sorted(ids))) or "none"


# ---- KEEP_LAST by flattening (spec §6.5) ------------------------------------------------------------


def being_flattened(image: Image) -> bool:
    return image.template.get_vector(FLATTEN) is not None


def flatten_cut(image: Image, keep_last: int | None) -> list[tuple[int, str]]:
    """The links to merge so that ``keep_last`` restore points remain: the oldest ``n - K + 1`` (their
    newest becomes the new base); none when the chain is not longer than K."""
    links = sorted((increment.id, increment.source) for increment in image.increments)
    if not keep_last or keep_last < 1 or len(links) <= keep_last:
        return []
    return links[: len(links) - keep_last + 1]


def flattened(image: Image, datastore: Datastore, merged: Sequence[tuple[int, str]], backup_id: str, size_mb: int,
              sha256: Mapping[str, str], now: float) -> Image:
    """The chain image once ``merged`` (base first) is one backup ``backup_id``: its last id is the new FULL
    base (its date kept), every older link is gone, and the later ones are untouched. The disks keep the
    VIRTUAL_SIZE the old base recorded."""
    base_id = merged[-1][0]
    old = {increment.id: increment for increment in image.increments}
    if sorted((increment.id, increment.source) for increment in image.increments)[: len(merged)] != list(merged):
        raise ActionError(f"chain image {image.id} no longer starts with the links that were merged")
    sizes = {f"disk.{disk_id}.{base_id}": size for disk_id, size in base_sizes(image).items()}
    template = image.template.copy()
    kept = [vector for vector in template.vectors(CHECKSUMS) if increment_of(vector) > base_id]
    template.remove(CHECKSUMS)
    for vector in [*checksum_vectors(base_id, sha256, sizes), *kept]:
        template.add(CHECKSUMS, vector)
    base = Increment(id=base_id, type=FULL, parent_id=-1, source=backup_id, size=size_mb, date=old[base_id].date)
    increments = [base, *(increment for increment in image.increments if increment.id > base_id)]
    chain = dataclasses.replace(image, template=template, increments=increments, modtime=int(now),
                                size=sum(increment.size for increment in increments))
    return _with_urls(chain, datastore)
