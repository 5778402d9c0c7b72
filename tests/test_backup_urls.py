"""Backup URLs (spec §5.3): the grammar, an image's URLs, finding a URL's image, recorded checksums."""

from __future__ import annotations

import pytest

from scheduler.backup import urls as backup_urls
from scheduler.backup.urls import BackupUrl, disk_urls, expected_sha256, locate, parse_url, url_vectors, with_urls
from scheduler.errors import NotFound, ValidationError
from scheduler.model.objects.datastore import Datastore
from scheduler.model.objects.image import Image, Increment
from scheduler.model.objects.states import DatastoreType, ImageType
from scheduler.model.template import Template, Vector

SPEC_RSYNC = "rsync://100/3/0:8a3454,1:f6e63e//var/lib/one/datastores/100/6/8a3454/disk.0.0"
SPEC_RESTIC = "restic://100//0:25f4b298,1:6968545c//var/lib/one/datastores/0/0/backup/disk.0.1"


@pytest.mark.parametrize(("text", "expected", "disk_id"), [
    (SPEC_RSYNC, BackupUrl("rsync", 100, 3, ((0, "8a3454"), (1, "f6e63e")),
                           "/var/lib/one/datastores/100/6/8a3454/disk.0.0"), 0),
    (SPEC_RESTIC, BackupUrl("restic", 100, None, ((0, "25f4b298"), (1, "6968545c")),
                            "/var/lib/one/datastores/0/0/backup/disk.0.1"), 0),
    ("fs://7//0:abc123//srv/backups/42/abc123/disk.2.0",
     BackupUrl("fs", 7, None, ((0, "abc123"),), "/srv/backups/42/abc123/disk.2.0"), 2),
    ("rsync+rbd://100/12/0:8a3454//srv/b/9/8a3454/disk.1.0",
     BackupUrl("rsync", 100, 12, ((0, "8a3454"),), "/srv/b/9/8a3454/disk.1.0", rbd=True), 1),
    ("restic+rbd://5//3:aaaaaa,4:bbbbbb//srv/r/1/backup/disk.10.4",  # a flattened chain starts above 0
     BackupUrl("restic", 5, None, ((3, "aaaaaa"), (4, "bbbbbb")), "/srv/r/1/backup/disk.10.4", rbd=True), 10),
])  # fmt: skip
def test_parse_and_format_round_trip(text: str, expected: BackupUrl, disk_id: int) -> None:
    url = parse_url(text)
    assert url == expected
    assert str(url) == text
    assert url.disk_id == disk_id
    assert (url.increment_id, url.source) == expected.chain[-1]


@pytest.mark.parametrize(("text", "complaint"), [
    ("http://100//0:8a3454//x/disk.0.0", "not a backup URL"),
    ("rsync+ceph://100//0:8a3454//x/disk.0.0", "not a backup URL"),
    ("rsync:/100//0:8a3454//x/disk.0.0", "not a backup URL"),
    ("rsync://100//0:8a3454/relative/disk.0.0", "absolute file path"),
    ("rsync://100/0:8a3454//x/disk.0.0", "absolute file path"),  # 6.6 form: no job segment
    ("rsync://x//0:8a3454//x/disk.0.0", "datastore id must be a number"),
    ("rsync://100/-1/0:8a3454//x/disk.0.0", "backup job id"),
    ("rsync://100//8a3454//x/disk.0.0", "bad chain element"),
    ("rsync://100//0://x/disk.0.0", "bad chain element"),
    ("rsync://100//a:8a3454//x/disk.0.0", "bad chain element"),
    ("rsync://100//1:8a3454,0:f6e63e//x/disk.0.0", "must rise"),
    ("rsync://100//0:8A34..//x/disk.0.0", "backup id"),
    ("rsync://100//0:8a3454//x/../../etc/disk.0.0", "'..'"),
    ("rsync://100//0:8a3454//x/vm.xml", "not a disk file"),
    ("rsync://100//0:8a3454//x/disk.0.0 ; rm -rf /", "absolute path of letters"),
])  # fmt: skip
def test_bad_urls_are_refused(text: str, complaint: str) -> None:
    with pytest.raises(ValidationError, match=complaint):
        parse_url(text)


@pytest.mark.parametrize(("up_to", "expected"), [(-1, "0:a1a1a1,1:b2b2b2,2:c3c3c3"), (0, "0:a1a1a1"),
                                                 (1, "0:a1a1a1,1:b2b2b2")])
def test_chain_up_to(up_to: int, expected: str) -> None:
    chain = backup_urls.parse_chain("0:a1a1a1,1:b2b2b2,2:c3c3c3")
    assert backup_urls.format_chain(backup_urls.chain_up_to(chain, up_to)) == expected


def test_chain_up_to_an_increment_not_in_it() -> None:
    with pytest.raises(ValidationError, match="increment 5 is not in the chain"):
        backup_urls.chain_up_to(backup_urls.parse_chain("0:a1a1a1,1:b2b2b2"), 5)


# --- an image's URLs -------------------------------------------------------------------------------------------

def datastore(ds_id: int = 100, ds_mad: str = "rsync", base_path: str = "/srv/backups") -> Datastore:
    template = Template()
    template.set("BASE_PATH", base_path)
    return Datastore(id=ds_id, name=f"ds{ds_id}", type=DatastoreType.BACKUP_DS, ds_mad=ds_mad, template=template)


def image(image_id: int = 4, source: str = "8a3454", vm_id: int = 6, disks: tuple[int, ...] = (0, 1),
          ds_id: int = 100, job: str = "", fmt: str = "raw", **extra: object) -> Image:
    img = Image(id=image_id, name=f"{vm_id} backup", type=ImageType.BACKUP, source=source, datastore_id=ds_id,
                vms=[vm_id], backup_disk_ids=list(disks), format=fmt, **extra)  # type: ignore[arg-type]
    if job:
        img.template.set("BACKUP_JOB_ID", job)
    for disk in disks:
        img.template.add("CHECKSUMS", Vector([("FILE", f"disk.{disk}.0"), ("SHA256", f"{disk:064x}")]))
    img.template.add("CHECKSUMS", Vector([("FILE", "vm.xml"), ("SHA256", "AB" * 32)]))
    return img


@pytest.mark.parametrize(("ds", "img", "expected"), [
    (datastore(), image(),
     {0: "rsync://100//0:8a3454//srv/backups/6/8a3454/disk.0.0",
      1: "rsync://100//0:8a3454//srv/backups/6/8a3454/disk.1.0"}),
    (datastore(7, "fs", "/var/lib/vmsched/bk/"), image(ds_id=7, disks=(2,), job="3"),
     {2: "fs://7/3/0:8a3454//var/lib/vmsched/bk/6/8a3454/disk.2.0"}),
    (datastore(9, "restic", "/repos"), image(ds_id=9, source="25f4b298", vm_id=0, disks=(0,)),
     {0: "restic://9//0:25f4b298//repos/0/backup/disk.0.0"}),
    (datastore(), image(fmt="rbd", disks=(0,)), {0: "rsync+rbd://100//0:8a3454//srv/backups/6/8a3454/disk.0.0"}),
    (datastore(), image(disks=()), {}),
])  # fmt: skip
def test_disk_urls_of_an_image(ds: Datastore, img: Image, expected: dict[int, str]) -> None:
    assert disk_urls(img, ds) == expected
    for disk_id, text in expected.items():
        url = parse_url(text)
        assert url.disk_id == disk_id and url.chain == ((0, img.source),)


def test_disk_ids_come_from_the_checksums_when_the_image_does_not_list_them() -> None:
    img = image(disks=(0, 3))
    img.backup_disk_ids = []
    assert list(disk_urls(img, datastore())) == [0, 3]


def test_the_url_of_an_increment_names_it() -> None:
    img = image(disks=(0,), increments=[Increment(0, "FULL", -1, "a1a1a1", 10, 1), Increment(1, "INCREMENT", 0,
                                                                                             "b2b2b2", 2, 2)])
    assert disk_urls(img, datastore()) == {0: "rsync://100//0:a1a1a1,1:b2b2b2//srv/backups/6/b2b2b2/disk.0.1"}
    assert disk_urls(img, datastore(), 0) == {0: "rsync://100//0:a1a1a1//srv/backups/6/a1a1a1/disk.0.0"}


def test_url_vectors_and_images_recorded_without_them() -> None:
    img, ds = image(), datastore()
    vectors = url_vectors(img, ds)
    assert [v.items() for v in vectors] == [
        [("DISK_ID", "0"), ("URL", "rsync://100//0:8a3454//srv/backups/6/8a3454/disk.0.0")],
        [("DISK_ID", "1"), ("URL", "rsync://100//0:8a3454//srv/backups/6/8a3454/disk.1.0")],
    ]
    shown = with_urls(img, ds)
    assert shown is not img and shown.template.vectors("BACKUP_URL") == vectors
    assert img.template.vectors("BACKUP_URL") == []  # the stored object is left alone
    assert with_urls(shown, ds) is shown  # already there: not added twice
    assert with_urls(img, None) is img


def test_a_datastore_without_urls_is_refused() -> None:
    with pytest.raises(ValidationError, match="no backup URLs for DS_MAD 'ceph'"):
        disk_urls(image(), datastore(ds_mad="ceph"))


def test_expected_sha256() -> None:
    img = image()
    assert expected_sha256(img, "disk.1.0") == f"{1:064x}"
    assert expected_sha256(img, "vm.xml") == "ab" * 32
    with pytest.raises(NotFound, match="no checksum recorded for disk.5.0"):
        expected_sha256(img, "disk.5.0")


# --- finding a URL's image ---------------------------------------------------------------------------------------

def test_locate_finds_the_image_of_each_of_its_urls() -> None:
    images = [image(1, "aaaaaa"), image(2, "8a3454"), image(3, "8a3454", ds_id=7)]
    stores = [datastore(), datastore(7, "fs", "/b")]
    for expected in (images[1], images[2]):
        ds = stores[0] if expected.datastore_id == 100 else stores[1]
        for disk_id, text in disk_urls(expected, ds).items():
            found = locate(text, images, stores)
            assert (found.image.id, found.datastore.id, found.url.disk_id, found.vm_id) == (expected.id, ds.id,
                                                                                           disk_id, 6)


@pytest.mark.parametrize(("text", "complaint"), [
    ("rsync://101//0:8a3454//srv/backups/6/8a3454/disk.0.0", "no datastore 101"),
    ("rsync://100//0:bbbbbb//srv/backups/6/bbbbbb/disk.0.0", "no backup image of datastore 100 with backup bbbbbb"),
    ("rsync://100//0:8a3454//etc/6/8a3454/disk.0.0", "is not one of image 2's URLs"),
    ("rsync://100//0:8a3454//srv/backups/7/8a3454/disk.0.0", "is not one of image 2's URLs"),
    ("rsync://100//0:8a3454//srv/backups/6/8a3454/disk.5.0", "is not one of image 2's URLs"),
    ("rsync://100/4/0:8a3454//srv/backups/6/8a3454/disk.0.0", "is not one of image 2's URLs"),
    ("fs://100//0:8a3454//srv/backups/6/8a3454/disk.0.0", "is not one of image 2's URLs"),
    ("rsync://100//0:8a3454,1:cccccc//srv/backups/6/cccccc/disk.0.1", "does not fit image 2"),
])  # fmt: skip
def test_locate_refuses_urls_an_image_does_not_have(text: str, complaint: str) -> None:
    images = [image(1, "aaaaaa"), image(2, "8a3454"), Image(id=3, name="os", source="8a3454", datastore_id=100)]
    with pytest.raises(NotFound, match=complaint):
        locate(text, images, [datastore()])
