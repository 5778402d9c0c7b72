"""Increment chains, the pure part (scheduler.backup.chain): which link a backup takes, and the chain image."""

from __future__ import annotations

import json

import pytest

from drivers.datastore import merge
from scheduler.backup import chain
from scheduler.errors import ActionError
from scheduler.model.objects.datastore import Datastore
from scheduler.model.objects.image import Image
from scheduler.model.objects.states import DatastoreType, ImageType
from scheduler.model.objects.vm import Vm
from scheduler.model.template import Template, Vector
from tests.xsd import validate

DATASTORE = Datastore(id=100, name="bk", type=DatastoreType.BACKUP_DS, ds_mad="rsync",
                      template=Template.parse('BASE_PATH = "/srv/bk"\nRSYNC_HOST = "b"'))
SHA = {"disk.0.0": "a" * 64, "disk.1.0": "b" * 64, "vm.xml": "c" * 64}


def vm(mode: str = "INCREMENT", image: int = -1, last: int = -1, **extra: str) -> Vm:
    config = Vector([("MODE", mode), ("INCREMENTAL_BACKUP_ID", str(image)), ("LAST_INCREMENT_ID", str(last)),
                     *extra.items()])
    return Vm(id=7, name="v", backup_config=config)


def full_image(image_id: int = 5) -> Image:
    image = Image(id=image_id, name="7 x", type=ImageType.BACKUP, source="aaaaaa", size=30, datastore_id=100,
                  vms=[7], backup_disk_ids=[0, 1])
    for name, digest in SHA.items():
        image.template.add("CHECKSUMS", Vector([("FILE", name), ("SHA256", digest)]))
    return image


def base(image_id: int = 5) -> Image:
    return chain.start_chain(full_image(image_id), DATASTORE, chain.new_chain(), 30,
                             {"disk.0.0": 64 << 20, "disk.1.0": 32 << 20}, 1000)


def test_full_mode_takes_no_link() -> None:
    assert chain.next_link(vm("FULL"), {}, [0, 1], reset=False) is None


def test_the_first_backup_is_a_base_and_the_next_continues_the_chain() -> None:
    assert chain.next_link(vm(), {}, [0, 1], reset=False) == chain.Link(0)
    image = base()
    link = chain.next_link(vm(image=5, last=0), {5: image}, [1, 0], reset=False)
    assert link is not None and (link.increment_id, link.image, link.reason) == (1, image, "")
    assert link.sizes == {0: 64 << 20, 1: 32 << 20}


@pytest.mark.parametrize(("pointers", "disks", "reset", "reason", "cause"), [
    ((5, 0), [0, 1], True, "a reset was asked for", "reset"),
    ((6, 0), [0, 1], False, "chain image 6 is gone", "image_gone"),
    ((5, 3), [0, 1], False, "ends at increment 0, the VM's LAST_INCREMENT_ID is 3", "pointers"),
    ((5, 0), [0], False, "the disks backed up changed (chain image 5 has 0, 1, the VM now backs up 0)",
     "disks_changed"),
])
def test_a_new_chain_starts_when_the_old_one_cannot_go_on(pointers: tuple[int, int], disks: list[int],
                                                          reset: bool, reason: str, cause: str) -> None:
    link = chain.next_link(vm(image=pointers[0], last=pointers[1]), {5: base()}, disks, reset=reset)
    assert link is not None and link.increment_id == 0 and link.image is None
    assert reason in link.reason and link.cause == cause


def test_no_backup_while_the_chain_is_flattened() -> None:
    with pytest.raises(ActionError, match="ACTIVE_FLATTEN") as caught:
        chain.next_link(vm(image=5, last=0, ACTIVE_FLATTEN="YES"), {5: base()}, [0, 1], reset=False)
    assert caught.value.retryable


def test_a_base_image_holds_one_full_link_with_its_checksums_and_urls() -> None:
    image = base()
    [link] = image.increments
    assert (link.id, link.type, link.parent_id, link.source, link.size, link.date) == (0, "FULL", -1, "aaaaaa", 30, 1000)
    sums = {(v["FILE"], v["INCREMENT_ID"], v.get("VIRTUAL_SIZE")) for v in image.template.vectors("CHECKSUMS")}
    assert sums == {("disk.0.0", "0", str(64 << 20)), ("disk.1.0", "0", str(32 << 20)), ("vm.xml", "0", None)}
    assert [v["URL"] for v in image.template.vectors("BACKUP_URL")] == [
        "rsync://100//0:aaaaaa//srv/bk/7/aaaaaa/disk.0.0", "rsync://100//0:aaaaaa//srv/bk/7/aaaaaa/disk.1.0"]
    assert chain.REASON not in image.template
    validate(image.to_xml(), "image")


def test_a_link_added_sums_the_sizes_and_points_the_urls_at_it() -> None:
    image = chain.add_link(base(), DATASTORE, 1, "bbbbbb", 3, {"disk.0.1": "d" * 64, "vm.xml": "e" * 64},
                           {"disk.0.1": 64 << 20}, 2000)
    assert [(i.id, i.type, i.parent_id, i.source) for i in image.increments] == [
        (0, "FULL", -1, "aaaaaa"), (1, "INCREMENT", 0, "bbbbbb")]
    assert image.size == 33 and image.source == "aaaaaa" and image.sources == ["aaaaaa", "bbbbbb"]
    assert image.template.vectors("BACKUP_URL")[0]["URL"] == "rsync://100//0:aaaaaa,1:bbbbbb//srv/bk/7/bbbbbb/disk.0.1"
    assert len(image.template.vectors("BACKUP_URL")) == 2
    assert chain.base_sizes(image) == {0: 64 << 20, 1: 32 << 20}  # the base's sizes, not the link's
    validate(image.to_xml(), "image")
    with pytest.raises(ActionError, match="ends at increment 1: increment 3 does not follow it"):
        chain.add_link(image, DATASTORE, 3, "cccccc", 1, {}, {}, 3000)


def test_the_reason_of_a_new_chain_is_kept_on_its_image() -> None:
    image = chain.start_chain(full_image(), DATASTORE, chain.new_chain("checkpoint gone", "checkpoint"), 30, {}, 1000)
    assert image.template.get(chain.REASON) == "checkpoint gone"
    assert image.template.get(chain.CAUSE) == "checkpoint"
    validate(image.to_xml(), "image")


def chain_of(links: int) -> Image:
    image = base()
    for n in range(1, links):
        image = chain.add_link(image, DATASTORE, n, f"{n:06x}", 2, {f"disk.0.{n}": f"{n:x}" * 64, "vm.xml": "e" * 64},
                               {}, 1000 + n)
    return image


@pytest.mark.parametrize(("links", "keep", "merged"), [
    (3, 2, [0, 1]), (4, 2, [0, 1, 2]), (2, 2, []), (3, None, []), (3, 0, []), (5, 1, [0, 1, 2, 3, 4]),
])
def test_keep_last_merges_the_oldest_links_into_the_kth_newest(links: int, keep: int | None, merged: list[int]) -> None:
    assert [n for n, _ in chain.flatten_cut(chain_of(links), keep)] == merged


def test_a_flattened_chain_starts_at_its_merged_base_and_keeps_the_later_links() -> None:
    image = chain_of(4)
    cut = chain.flatten_cut(image, 2)
    flat = chain.flattened(image, DATASTORE, cut, "ffffff", 40, {"disk.0.2": "f" * 64, "disk.1.2": "9" * 64}, 5000)
    assert [(i.id, i.type, i.parent_id, i.source, i.size, i.date) for i in flat.increments] == [
        (2, "FULL", -1, "ffffff", 40, 1002), (3, "INCREMENT", 2, "000003", 2, 1003)]
    assert flat.size == 42 and flat.sources == ["ffffff", "000003"]
    sums = {(v["FILE"], v["INCREMENT_ID"], v.get("VIRTUAL_SIZE")) for v in flat.template.vectors("CHECKSUMS")}
    assert sums == {("disk.0.2", "2", str(64 << 20)), ("disk.1.2", "2", str(32 << 20)),
                    ("disk.0.3", "3", None), ("vm.xml", "3", None)}
    assert chain.base_sizes(flat) == {0: 64 << 20, 1: 32 << 20}
    assert flat.template.vectors("BACKUP_URL")[0]["URL"] == "rsync://100//2:ffffff,3:000003//srv/bk/7/000003/disk.0.3"
    validate(flat.to_xml(), "image")
    with pytest.raises(ActionError, match="no longer starts with the links that were merged"):
        chain.flattened(flat, DATASTORE, cut, "eeeeee", 1, {}, 6000)


def test_the_merge_opens_the_chain_base_first_without_touching_the_files() -> None:
    spec = merge.chain_spec(["/s/a/disk.0.0", "/s/b/disk.0.1"])
    assert json.loads(spec.removeprefix("json:")) == {
        "driver": "qcow2", "file": {"driver": "file", "filename": "/s/b/disk.0.1"},
        "backing": {"driver": "qcow2", "file": {"driver": "file", "filename": "/s/a/disk.0.0"}, "backing": None}}
    assert merge.convert_argv(["/x"], "/out") == ["qemu-img", "convert", "-q", "-O", "qcow2", merge.chain_spec(["/x"]),
                                                  "/out"]
