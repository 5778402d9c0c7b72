"""drivers.vmm.checkpoints: checkpoint and push-mode backup XML, vmsched's names, qcow2 bitmaps (pure)."""

from __future__ import annotations

import json

import pytest
from lxml import etree

from drivers.vmm.checkpoints import backup_xml, checkpoint_name, checkpoint_xml, parse_bitmaps, parse_checkpoint_name
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
