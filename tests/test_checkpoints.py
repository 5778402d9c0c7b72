"""drivers.vmm.checkpoints: checkpoint and push-mode backup XML, vmsched's names, qcow2 bitmaps (pure)."""

from __future__ import annotations

import json

import pytest
from lxml import etree

from drivers.vmm.checkpoints import (
    backup_xml,
    checkpoint_name,
    checkpoint_xml,
    parse_bitmaps,
    parse_checkpoint_name,
    parse_node_bitmaps,
    redefine_xml,
)
from drivers.vmm.domainxml import Disk
from scheduler.errors import ValidationError

DISKS = [Disk("vda", format="qcow2", path="/d/vda.qcow2"), Disk("vdb", format="raw", path="/d/vdb.raw"),
         Disk("hda", device="cdrom", format="raw", readonly=True, path="/d/cd.iso")]


def disks_of(xml: str) -> dict[str, dict[str, str]]:
    return {d.get("name"): dict(d.attrib) for d in etree.fromstring(xml).iterfind("disks/disk")}


def test_a_checkpoint_tracks_the_qcow2_disks_asked_and_names_every_other_disk_no() -> None:
    xml = checkpoint_xml("vmsched-7-0", DISKS, ["vda"])
    assert etree.fromstring(xml).findtext("name") == "vmsched-7-0"
    assert disks_of(xml) == {"vda": {"name": "vda", "checkpoint": "bitmap"}, "vdb": {"name": "vdb", "checkpoint": "no"}}


def test_a_backup_job_copies_into_new_qcow2_targets_since_a_checkpoint() -> None:
    root = etree.fromstring(backup_xml(DISKS, {"vda": "/stage/disk.0.3"}, "vmsched-7-2"))
    assert root.get("mode") == "push" and root.findtext("incremental") == "vmsched-7-2"
    vda = root.find("disks/disk[@name='vda']")
    assert vda is not None and vda.get("backup") == "yes"
    assert vda.find("target").get("file") == "/stage/disk.0.3" and vda.find("driver").get("type") == "qcow2"
    assert disks_of(etree.tostring(root, encoding="unicode"))["vdb"] == {"name": "vdb", "backup": "no"}
    assert etree.fromstring(backup_xml(DISKS, {"vda": "/s/disk.0.0"}, None)).find("incremental") is None  # base


@pytest.mark.parametrize("target", ["vdb", "hda", "vdz"])
def test_only_writable_qcow2_file_disks_carry_bitmaps(target: str) -> None:
    with pytest.raises(ValidationError):
        checkpoint_xml("vmsched-7-0", DISKS, [target])
    with pytest.raises(ValidationError):
        backup_xml(DISKS, {target: "/s/x"}, None)


def test_bitmaps_with_their_flags() -> None:
    info = {"format": "qcow2", "format-specific": {"type": "qcow2", "data": {"bitmaps": [
        {"name": "vmsched-7-0", "granularity": 65536, "flags": ["auto"]},
        {"name": "vmsched-7-1", "granularity": 65536, "flags": ["in-use", "auto"]},
        {"name": "other", "granularity": 65536, "flags": ["inconsistent"]}]}}}
    found = parse_bitmaps(json.dumps(info))
    assert [(b.name, b.sound) for b in found] == [("vmsched-7-0", True), ("vmsched-7-1", False), ("other", False)]
    assert parse_bitmaps(json.dumps({"format": "raw"})) == []
    with pytest.raises(ValidationError, match="cannot read the bitmaps"):
        parse_bitmaps("{not json")


def test_a_journaled_checkpoint_is_recovered_only_when_it_is_vmscheds() -> None:
    from drivers.tm.plan import Step, artifacts_from_steps, step

    ours = artifacts_from_steps([step(Step.CHECKPOINT, "9", checkpoint="vmsched-5-3")])
    assert ours is not None and ours.checkpoint == "vmsched-5-3" and ours.refused == []
    foreign = artifacts_from_steps([step(Step.CHECKPOINT, "9", checkpoint="one-5-3")])
    assert foreign is not None and foreign.checkpoint is None and foreign.refused == ["one-5-3"]


def test_checkpoint_names_are_vmscheds_only() -> None:
    assert checkpoint_name(7, 3) == "vmsched-7-3" and parse_checkpoint_name("vmsched-7-3") == (7, 3)
    assert parse_checkpoint_name("one-7-3") is None and parse_checkpoint_name("vmsched-7-3x") is None
    with pytest.raises(ValidationError):
        checkpoint_name(-1, 0)


def test_a_running_qemus_bitmaps_per_image_file_with_the_flags_qemu_img_would_show() -> None:
    reply = json.dumps({"return": [
        {"node-name": "libvirt-1-format", "drv": "qcow2", "file": "/d/vda.qcow2", "dirty-bitmaps": [
            {"name": "vmsched-5-0", "granularity": 65536, "recording": True, "busy": False, "persistent": True},
            {"name": "vmsched-5-1", "granularity": 65536, "recording": True, "busy": False, "inconsistent": True},
            {"name": "off", "granularity": 65536, "recording": False, "busy": True}]},
        {"node-name": "libvirt-1-storage", "drv": "file", "file": "/d/vda.qcow2", "dirty-bitmaps": []},
        {"node-name": "libvirt-2-format", "drv": "raw", "file": "/d/vdb.raw"},
    ]})
    [good, bad, off] = parse_node_bitmaps(reply)["/d/vda.qcow2"]
    assert good.sound and (good.name, good.granularity, good.flags) == ("vmsched-5-0", 65536, ())
    assert not bad.sound and bad.flags == ("inconsistent",)
    assert not off.sound and off.flags == ("not-recording", "busy")
    assert set(parse_node_bitmaps(reply)) == {"/d/vda.qcow2"}
    with pytest.raises(ValidationError, match="query-named-block-nodes"):
        parse_node_bitmaps('{"error": {}}')


def test_a_lost_checkpoint_record_is_redefined_with_its_parent_and_its_bitmaps() -> None:
    root = etree.fromstring(redefine_xml("vmsched-5-2", "vmsched-5-1", 1700000000, ["vda", "vdb"]))
    assert root.findtext("name") == "vmsched-5-2" and root.findtext("parent/name") == "vmsched-5-1"
    assert root.findtext("creationTime") == "1700000000"
    assert [(d.get("name"), d.get("checkpoint"), d.get("bitmap")) for d in root.iterfind("disks/disk")] == [
        ("vda", "bitmap", "vmsched-5-2"), ("vdb", "bitmap", "vmsched-5-2")]
    assert etree.fromstring(redefine_xml("vmsched-5-0", None, 1, ["vda"])).find("parent") is None
