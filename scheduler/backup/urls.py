"""Backup URLs (spec §5.3): one URL per backed-up disk, the way a download or a restore names it; pure.

Grammar: ``<proto>://<backup_ds_id>/<bj_id>/<chain>/<file_path>``

* ``proto``: ``rsync`` or ``restic`` as in OpenNebula, and ``fs`` for vmsched's local-directory datastore
  (our extension: the same layout as ``rsync``, on the scheduler's own machine); ``+rbd`` after it when the
  image's FORMAT is ``rbd``;
* ``bj_id``: the image's ``TEMPLATE/BACKUP_JOB_ID``, empty when the backup was not taken by a job;
* ``chain``: ``<increment_id>:<source>`` pairs, comma-separated, cut at the increment the URL names; a full
  backup is ``0:<SOURCE>``;
* ``file_path``: the absolute path of the disk file, ``disk.<disk_id>.<increment>``. ``rsync``/``fs``: where
  it lies on the server, ``<BASE_PATH>/<vm_id>/<source>/disk.<id>.<inc>``. ``restic``: the snapshot's files
  are found by name, so the path is ``<BASE_PATH>/<vm_id>/backup/disk.<id>.<inc>`` (the repository, then
  ``backup/``): the VM id sits before ``backup/`` as OpenNebula's downloader expects.

So ``rsync://100//0:8a3454//var/lib/one/datastores/100/6/8a3454/disk.0.0`` is disk 0 of backup ``8a3454``
of VM 6, and ``rsync://100//0:8a3454,1:f6e63e//.../6/f6e63e/disk.0.1`` that disk at increment 1 of a chain
(restores and verification read every link; the HTTP download serves a later increment as the links merged
into one qcow2).

Each backup image carries its URLs as ``TEMPLATE/BACKUP_URL = [ DISK_ID, URL ]`` vectors
(:func:`url_vectors`); the download endpoint and the restore find a URL's image with :func:`locate`, which
only accepts a URL equal to one the image itself produces, so a URL cannot point anywhere else.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from dataclasses import dataclass

from drivers.datastore import DRIVERS, layout, url_path
from scheduler.errors import ActionError, NotFound, ValidationError
from scheduler.model.objects.datastore import Datastore
from scheduler.model.objects.image import Image
from scheduler.model.objects.states import ImageType
from scheduler.model.template import Vector

PROTOS = tuple(DRIVERS)  # a backup URL names its datastore's kind
RBD_SUFFIX = "+rbd"
URL_ATTRIBUTE = "BACKUP_URL"
IMAGE_HEADER = "X-Vmsched-Image-Id"  # the download endpoint's reply names the URL's image in this header
MERGED_HEADER = "X-Vmsched-Merged-Links"  # a download of a later increment: the links merged

Chain = layout.Chain

_DIGITS = re.compile(r"[0-9]+\Z")
_DISK_FILE = re.compile(r"disk\.([0-9]+)\.([0-9]+)\Z")


@dataclass(frozen=True)
class BackupUrl:
    """One parsed backup URL; ``bj_id`` None when the backup was not taken by a backup job."""

    proto: str  # rsync | restic | fs
    ds_id: int
    bj_id: int | None
    chain: Chain
    path: str
    rbd: bool = False

    def __str__(self) -> str:
        return format_url(self)

    @property
    def file_name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def disk_id(self) -> int:
        """The ``<idx>`` of ``disk.<idx>.<inc>``."""
        return layout.disk_index(self.file_name)

    @property
    def increment_id(self) -> int:
        """The last increment of the chain: the one the URL names."""
        return self.chain[-1][0]

    @property
    def source(self) -> str:
        """The backend reference of the increment the URL names."""
        return self.chain[-1][1]


# --- grammar ----------------------------------------------------------------------------------------------

format_chain = layout.chain_text


def format_url(url: BackupUrl) -> str:
    proto = url.proto + (RBD_SUFFIX if url.rbd else "")
    job = "" if url.bj_id is None else str(url.bj_id)
    return f"{proto}://{url.ds_id}/{job}/{format_chain(url.chain)}/{url.path}"


def parse_chain(text: str) -> Chain:
    """``0:abc,1:def`` -> ((0, "abc"), (1, "def")); increment ids rising (a flattened chain may start above 0)."""
    links = layout.parse_chain(text)
    for _, source in links:
        layout.check_backup_id(source)
    ids = [increment for increment, _ in links]
    if any(later <= earlier for earlier, later in zip(ids, ids[1:], strict=False)):
        raise ValidationError(f"chain {text!r}: increment ids must rise")
    return links


def parse_url(text: str) -> BackupUrl:
    """Parse a backup URL, splitting after ``://`` on the first three ``/`` (spec §5.3)."""
    if not isinstance(text, str):
        raise ValidationError(f"a backup URL must be a string, got {text!r}")
    proto, sep, rest = text.partition("://")
    base = proto.removesuffix(RBD_SUFFIX)
    if not sep or base not in PROTOS:
        raise ValidationError(f"not a backup URL (expected {', '.join(p + '://' for p in PROTOS)}): {text!r}")
    fields = rest.split("/", 3)
    if len(fields) != 4 or not fields[3].startswith("/"):
        raise ValidationError(f"backup URL without <datastore>/<job>/<chain>/<absolute file path>: {text!r}")
    ds, job, chain, path = fields
    if not _DIGITS.match(ds):
        raise ValidationError(f"backup URL: datastore id must be a number, got {ds!r}")
    if job and not _DIGITS.match(job):
        raise ValidationError(f"backup URL: backup job id must be empty or a number, got {job!r}")
    layout.check_path(path, "backup URL file path")
    url = BackupUrl(proto=base, ds_id=int(ds), bj_id=int(job) if job else None, chain=parse_chain(chain),
                    path=path, rbd=proto.endswith(RBD_SUFFIX))
    url.disk_id  # noqa: B018  - the file must be a disk file
    return url


def chain_up_to(chain: Chain, increment_id: int = -1) -> Chain:
    """The chain cut after ``increment_id`` (-1: the whole chain)."""
    return layout.chain_up_to(chain, None if increment_id < 0 else increment_id)


# --- an image's URLs ---------------------------------------------------------------------------------------

def image_chain(image: Image) -> Chain:
    """The image's chain: its BACKUP_INCREMENTS, or ``0:<SOURCE>`` for a full backup."""
    if image.increments:
        return tuple((inc.id, inc.source) for inc in sorted(image.increments, key=lambda inc: inc.id))
    if not image.source:
        raise ValidationError(f"backup image {image.id} has no SOURCE")
    return ((0, image.source),)


def image_vm_id(image: Image) -> int:
    if not image.vms:
        raise ValidationError(f"backup image {image.id} names no VM (VMS is empty)")
    return image.vms[0]


def image_disk_ids(image: Image) -> list[int]:
    """BACKUP_DISK_IDS; for an image without them, the disks its CHECKSUMS name."""
    if image.backup_disk_ids:
        return list(image.backup_disk_ids)
    found = {int(m.group(1)) for name in checksums(image) if (m := _DISK_FILE.match(name))}
    return sorted(found)


def disk_path(image: Image, datastore: Datastore, disk_id: int, increment_id: int = -1) -> str:
    """Where disk ``disk_id`` of the image (up to ``increment_id``) lies, as its URL says."""
    chain = chain_up_to(image_chain(image), increment_id)
    increment, source = chain[-1]
    return url_path(datastore, image_vm_id(image), source, layout.disk_file_name(disk_id, increment))


def disk_url(image: Image, datastore: Datastore, disk_id: int, increment_id: int = -1) -> BackupUrl:
    check_backup_image(image)
    if datastore.ds_mad not in DRIVERS:
        raise ValidationError(f"datastore {datastore.id}: no backup URLs for DS_MAD {datastore.ds_mad!r}")
    job = (image.template.get("BACKUP_JOB_ID") or "").strip()
    return BackupUrl(proto=datastore.ds_mad, ds_id=datastore.id,
                     bj_id=int(job) if _DIGITS.match(job) else None,
                     chain=chain_up_to(image_chain(image), increment_id),
                     path=disk_path(image, datastore, disk_id, increment_id), rbd=image.format == "rbd")


def disk_urls(image: Image, datastore: Datastore, increment_id: int = -1) -> dict[int, str]:
    """``{disk_id: URL}`` for every disk of a backup image (up to ``increment_id``, -1: the last)."""
    return {disk_id: str(disk_url(image, datastore, disk_id, increment_id)) for disk_id in image_disk_ids(image)}


def url_vectors(image: Image, datastore: Datastore) -> list[Vector]:
    """``BACKUP_URL = [ DISK_ID, URL ]`` vectors to put in the image's TEMPLATE."""
    return [Vector([("DISK_ID", str(disk_id)), ("URL", url)])
            for disk_id, url in disk_urls(image, datastore).items()]


def with_urls(image: Image, datastore: Datastore | None) -> Image:
    """The image itself when it has its BACKUP_URL vectors (or cannot have them), else a copy with them:
    what ``one.image.info`` shows for an image recorded before the URLs were."""
    if image.type != ImageType.BACKUP or datastore is None or image.template.vectors(URL_ATTRIBUTE):
        return image
    try:
        vectors = url_vectors(image, datastore)
    except (ValidationError, ActionError):
        return image
    template = image.template.copy()
    for vector in vectors:
        template.add(URL_ATTRIBUTE, vector)
    return dataclasses.replace(image, template=template)


def check_backup_image(image: Image) -> None:
    if image.type != ImageType.BACKUP:
        raise ValidationError(f"image {image.id} is not a backup image")


# --- checksums ------------------------------------------------------------------------------------------------

def checksums(image: Image, increment_id: int | None = None) -> dict[str, str]:
    """``{file name: sha256}`` from the image's ``TEMPLATE/CHECKSUMS`` vectors: all of them (a chain's disk
    files have names of their own), or those of increment ``increment_id``."""
    found = {}
    for vector in image.template.vectors("CHECKSUMS"):
        name, digest = vector.get("FILE") or "", (vector.get("SHA256") or "").lower()
        if name and digest and increment_id in (None, increment_of(vector)):
            found[name] = digest
    return found


def increment_of(vector: Vector) -> int:
    """The INCREMENT_ID of a CHECKSUMS vector; 0 for a full backup's, which has none."""
    raw = (vector.get("INCREMENT_ID") or "0").strip()
    return int(raw) if raw.isdigit() else 0


def expected_sha256(image: Image, file_name: str) -> str:
    """The sha256 recorded at backup time for ``file_name`` (``disk.0.0``, ``vm.xml``)."""
    digest = checksums(image).get(file_name)
    if digest is None:
        raise NotFound(f"backup image {image.id} has no checksum recorded for {file_name}")
    return digest


# --- from a URL back to its image ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Located:
    """A URL's image and datastore, and the file it names."""

    url: BackupUrl
    image: Image
    datastore: Datastore

    @property
    def vm_id(self) -> int:
        return image_vm_id(self.image)


def locate(text: str, images: Iterable[Image], datastores: Iterable[Datastore]) -> Located:
    """The backup image a URL belongs to. NotFound unless the URL is exactly one of that image's own URLs."""
    url = parse_url(text)
    datastore = next((ds for ds in datastores if ds.id == url.ds_id), None)
    if datastore is None:
        raise NotFound(f"backup URL {text}: no datastore {url.ds_id}")
    first = url.chain[0][1]
    for image in images:
        if image.type != ImageType.BACKUP or image.datastore_id != url.ds_id:
            continue
        try:
            if image_chain(image)[0][1] != first:
                continue
            own = disk_urls(image, datastore, url.increment_id)
        except ValidationError as exc:
            raise NotFound(f"backup URL {text} does not fit image {image.id}: {exc}") from None
        if own.get(url.disk_id) == str(url):
            return Located(url, image, datastore)
        listed = "; ".join(own.values()) or "none"
        raise NotFound(f"backup URL {text} is not one of image {image.id}'s URLs ({listed})")
    raise NotFound(f"backup URL {text}: no backup image of datastore {url.ds_id} with backup {first}")
