"""drivers.tm.plan: names of vmsched's files, request checks, qemu-img argv/output, journal replay (pure)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from drivers.tm import plan
from drivers.tm.errors import CaptureError
from drivers.tm.plan import Artifacts, DiskSource, FsFreeze, Step
from drivers.tm.snapshots import Layering, layering
from drivers.vmm.domainxml import Disk
from scheduler.errors import ValidationError

VDA = DiskSource(0, "vda", "/var/lib/vms/7/disk.0", "qcow2")
VDB = DiskSource(1, "vdb", "/var/lib/vms/7/disk.1", "raw")
STAGE = "/var/backups/7/17"


@pytest.mark.parametrize(("value", "mode"), [
    ("AGENT", FsFreeze.AGENT), ("agent", FsFreeze.AGENT), (" Suspend ", FsFreeze.SUSPEND), ("NONE", FsFreeze.NONE),
    ("", FsFreeze.NONE), (None, FsFreeze.NONE), ("TRY", FsFreeze.NONE), ("freeze", FsFreeze.NONE),
])
def test_fs_freeze_normalises_unknown_values_to_none(value: str | None, mode: FsFreeze) -> None:
    assert plan.fs_freeze(value) is mode


def test_names() -> None:
    assert plan.overlay_path("/d/disk.0", 17) == "/d/disk.0.vmsched-17.overlay"
    assert plan.staging_dir("/var/backups/", 7, "17") == "/var/backups/7/17"
    assert plan.staging_file(STAGE, 3) == "/var/backups/7/17/disk.3.0"
    assert plan.staging_file(STAGE, 3, increment=2) == "/var/backups/7/17/disk.3.2"


@pytest.mark.parametrize("run_id", ["", "-1", "a/b", "1 2", "../x", "x" * 65, "é"])
def test_run_ids_must_be_plain_tokens(run_id: str) -> None:
    with pytest.raises(ValidationError, match="plain token"):
        plan.overlay_path("/d/disk.0", run_id)


@pytest.mark.parametrize(("path", "ours"), [
    ("/d/disk.0.vmsched-17.overlay", True),
    ("/d/disk.0.vmsched-18.overlay", False),  # another run's
    ("/d/disk.0.vmsched-170.overlay", False),
    ("/d/.vmsched-17.overlay", False),  # nothing before the suffix
    ("d/disk.0.vmsched-17.overlay", False),  # relative
    ("/d/../etc/x.vmsched-17.overlay", False),
    ("/d/disk.0", False),
])
def test_overlay_names_of_a_run(path: str, ours: bool) -> None:
    assert plan.is_overlay_of_run(path, "17") is ours


@pytest.mark.parametrize(("path", "ours"), [
    ("/var/backups/7/17/disk.0.0", True),
    ("/var/backups/7/17/disk.12.3", True),
    ("/var/backups/7/18/disk.0.0", False),
    ("/var/backups/7/17/vm.xml", False),
    ("/var/backups/7/17/disk.0.0.part", False),
    ("/var/lib/vms/7/disk.0", False),
    ("/x/../17/disk.0.0", False),
    ("var/17/disk.0.0", False),
])
def test_staging_names_of_a_run(path: str, ours: bool) -> None:
    assert plan.is_staging_of_run(path, "17") is ours


@pytest.mark.parametrize(("disks", "run_id", "staging", "error"), [
    ([], 17, STAGE, "no disks"),
    ([VDA, DiskSource(0, "vdb", "/d/x", "raw")], 17, STAGE, "disk_id appears twice"),
    ([VDA, DiskSource(1, "vda", "/d/x", "raw")], 17, STAGE, "target appears twice"),
    ([VDA, DiskSource(1, "vdb", VDA.path, "raw")], 17, STAGE, "path appears twice"),
    ([DiskSource(0, "vda", "disk.0", "qcow2")], 17, STAGE, "'disk.0' is not absolute"),
    ([DiskSource(0, "vda", "/d/disk.0", "vmdk")], 17, STAGE, "is 'vmdk'; file disks must be one of qcow2, raw"),
    ([VDA], 18, STAGE, "must be an absolute path ending in the run id '18'"),
    ([VDA], 17, "backups/7/17", "must be an absolute path"),
    ([VDA], "a b", STAGE, "plain token"),
])
def test_check_request_refuses(disks: list[DiskSource], run_id: Any, staging: str, error: str) -> None:
    with pytest.raises(ValidationError, match=error):
        plan.check_request(disks, run_id, staging)


def test_check_request_returns_the_run_id_as_text() -> None:
    assert plan.check_request([VDA, VDB], 17, STAGE) == "17"


@pytest.mark.parametrize(("current", "error"), [
    ([Disk("vda", path=VDA.path, format="qcow2"), Disk("vdb", path=VDB.path, format="raw")], None),
    ([Disk("vda", path=VDA.path, format="qcow2")], "the domain has no disk 'vdb' \\(disks: vda\\)"),
    ([Disk("vda", path=VDA.path + ".vmsched-3.overlay", format="qcow2"), Disk("vdb", path=VDB.path, format="raw")],
     "disk 0 \\(vda\\) runs on .*vmsched-3.overlay \\(qcow2\\), not on /var/lib/vms/7/disk.0 \\(qcow2\\)"),
    ([Disk("vda", path=VDA.path, format="raw"), Disk("vdb", path=VDB.path, format="raw")], "runs on .* \\(raw\\)"),
    ([Disk("vda", path=VDA.path, format="qcow2"), Disk("vdb", type="block", path=VDB.path, format="raw")],
     "disk 1 \\(vdb\\) is a block disk, not a writable file disk"),
    ([Disk("vda", path=VDA.path, format="qcow2", readonly=True), Disk("vdb", path=VDB.path, format="raw")],
     "not a writable file disk"),
])
def test_check_sources(current: list[Disk], error: str | None) -> None:
    if error is None:
        plan.check_sources([VDA, VDB], current)
    else:
        with pytest.raises(ValidationError, match=error):
            plan.check_sources([VDA, VDB], current)


@pytest.mark.parametrize(("disk", "shared", "rate", "argv"), [
    (VDA, True, 0, ["qemu-img", "convert", "-q", "-m", "4", "-f", "qcow2", "-O", "qcow2", "-U", VDA.path, "/s/d"]),
    (VDB, False, 0, ["qemu-img", "convert", "-q", "-m", "4", "-f", "raw", "-O", "qcow2", VDB.path, "/s/d"]),
    (VDB, False, 52428800, ["qemu-img", "convert", "-q", "-m", "4", "-f", "raw", "-O", "qcow2", "-r", "52428800",
                            VDB.path, "/s/d"]),
])
def test_convert_argv(disk: DiskSource, shared: bool, rate: int, argv: list[str]) -> None:
    assert plan.convert_argv(disk, "/s/d", shared=shared, rate_limit=rate) == argv


def test_qemu_img_output() -> None:
    info = {"virtual-size": 67108864, "filename": "/s/d", "format": "qcow2", "actual-size": 2297856}
    assert plan.image_sizes(json.dumps(info).encode()) == (67108864, 2297856)
    assert plan.chain_allocated(json.dumps([info, {**info, "actual-size": 1000}, {"filename": "/x"}])) == 2298856
    chain = [{"filename": "/d/disk.0.vmsched-1.overlay"}, {"filename": "/d/disk.0"}, {"filename": "/t/template"}]
    assert plan.chain_files(json.dumps(chain)) == ["/d/disk.0.vmsched-1.overlay", "/d/disk.0", "/t/template"]
    assert plan.chain_files(json.dumps({"filename": "/d/raw"})) == ["/d/raw"]


# ---------------------------------------------------------------------------------------------- journal replay


def steps(*entries: tuple[Step, dict[str, Any]], run: str = "17") -> list[dict[str, Any]]:
    return [plan.step(name, run, **fields) for name, fields in entries]


OV_A = {"target": "vda", "path": "/d/disk.0.vmsched-17.overlay"}
OV_B = {"target": "vdb", "path": "/d/disk.1.vmsched-17.overlay"}


@pytest.mark.parametrize(("journal", "expected"), [
    (steps((Step.OVERLAY, OV_A), (Step.FROZEN, {})),
     Artifacts("17", frozen=True, overlays={"vda": OV_A["path"]})),
    (steps((Step.OVERLAY, OV_A), (Step.FROZEN, {}), (Step.THAWED, {}), (Step.STAGING, {"path": STAGE + "/disk.0.0"})),
     Artifacts("17", overlays={"vda": OV_A["path"]}, staging=[STAGE + "/disk.0.0"])),
    (steps((Step.OVERLAY, OV_A), (Step.OVERLAY, OV_B), (Step.SUSPENDED, {}), (Step.RESUMED, {}),
           (Step.COMMITTED, {"target": "vda"})),
     Artifacts("17", overlays={"vda": OV_A["path"], "vdb": OV_B["path"]}, committed={"vda"})),
    (steps((Step.NEXT_OVERLAY, {"target": "vda", "path": "/d/disk.0.vmsched-snap.7.3"}),
           (Step.NEXT_OVERLAY, {"target": "vdb", "path": "/d/disk.1"}), (Step.STAGING, {"path": STAGE + "/disk.0.2"})),
     Artifacts("17", next_overlays={"vda": "/d/disk.0.vmsched-snap.7.3"}, staging=[STAGE + "/disk.0.2"],
               refused=["/d/disk.1"])),
    (steps((Step.SUSPENDED, {}), (Step.STAGING, {"path": "/etc/passwd"}),
           (Step.OVERLAY, {"target": "vda", "path": "/d/disk.0"}), (Step.STAGING, {"path": "/etc/passwd"})),
     Artifacts("17", suspended=True, refused=["/etc/passwd", "/d/disk.0"])),
])
def test_artifacts_follow_the_journal(journal: list[dict[str, Any]], expected: Artifacts) -> None:
    assert plan.artifacts_from_steps(journal) == expected


def test_steps_of_other_drivers_are_ignored() -> None:
    foreign = [{"step": "upload", "tmp": "/x"}, {"tm": "ceph", "step": "overlay", "run": "17", "path": "/p"}]
    assert plan.artifacts_from_steps(foreign) is None
    assert plan.artifacts_from_steps([*foreign, *steps((Step.FROZEN, {}))]) == Artifacts("17", frozen=True)


def test_steps_of_two_runs_are_refused() -> None:
    with pytest.raises(ValidationError, match=r"several runs mixed together: \['17', '18'\]"):
        plan.artifacts_from_steps([*steps((Step.FROZEN, {})), *steps((Step.FROZEN, {}), run="18")])


def test_steps_are_plain_json() -> None:
    entry = plan.step(Step.OVERLAY, "17", **OV_A)
    assert json.loads(json.dumps(entry)) == {"tm": "qcow2", "step": "overlay", "run": "17", **OV_A}


@pytest.mark.parametrize(("path", "parsed"), [
    ("/d/disk.0.vmsched-snap.7.3", ("/d/disk.0", 7, 3)),
    ("/d/a b.qcow2.vmsched-snap.12.0", ("/d/a b.qcow2", 12, 0)),
    ("/d/disk.0.vmsched-snap.7.3.tmp", None),
    ("/d/disk.0.vmsched-snap.x.3", None),
    ("d/disk.0.vmsched-snap.7.3", None),
    ("/d/../etc/disk.vmsched-snap.7.3", None),
    ("/d/disk.0.vmsched-17.overlay", None),
])
def test_snapshot_overlay_names(path: str, parsed: tuple[str, int, int] | None) -> None:
    assert plan.parse_snapshot_overlay(path) == parsed
    assert plan.is_snapshot_overlay(path) is (parsed is not None)
    if parsed is not None:
        assert plan.snapshot_overlay_path(*parsed) == path


@pytest.mark.parametrize(("chain", "expected"), [
    (["/d/a"], Layering("vda", (), "/d/a")),
    (["/d/a.vmsched-snap.7.2", "/d/a", "/t/base"], Layering("vda", (("/d/a.vmsched-snap.7.2", 2),), "/d/a")),
    (["/d/a.vmsched-snap.7.3", "/d/a.vmsched-snap.7.2", "/d/a"],
     Layering("vda", (("/d/a.vmsched-snap.7.3", 3), ("/d/a.vmsched-snap.7.2", 2)), "/d/a")),
    # another VM's overlay, or one of another disk, is where this VM's end: never committed as ours
    (["/d/a.vmsched-snap.8.2", "/d/a"], Layering("vda", (), "/d/a.vmsched-snap.8.2")),
    (["/d/a.vmsched-snap.7.3", "/d/b.vmsched-snap.7.2", "/d/b"],
     Layering("vda", (("/d/a.vmsched-snap.7.3", 3),), "/d/b.vmsched-snap.7.2")),
    (["/d/user-snap", "/d/a.vmsched-snap.7.2", "/d/a"], Layering("vda", (), "/d/user-snap")),
])
def test_layering_splits_a_chain_into_the_vms_overlays_and_its_disk(chain: list[str], expected: Layering) -> None:
    found = layering("vda", chain, 7)
    assert found == expected
    assert found.top == chain[0]


def test_an_overlay_without_its_disk_is_an_error() -> None:
    with pytest.raises(CaptureError, match="has no backing file"):
        layering("vda", ["/d/a.vmsched-snap.7.2"], 7)
