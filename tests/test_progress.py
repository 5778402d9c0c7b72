"""Backup progress as the API and /metrics report it (scheduler/engine/progress.py, scheduler/engine/metrics.py)."""

from __future__ import annotations

from scheduler.engine.metrics import progress_lines
from scheduler.engine.progress import CAPTURE, UPLOAD, ProgressBoard

MIB = 1024 * 1024


def test_capture_then_upload_report_bytes_per_disk_and_overall() -> None:
    board = ProgressBoard()
    p = board.open(7, vm_id=3, now=100.0)
    assert p.as_struct(101.0) == {"PHASE": "starting", "DONE": 0.0, "TOTAL": 0.0, "ELAPSED": 1.0, "RUN_ID": 7,
                                  "DISKS": []}
    p.begin(CAPTURE, [0, 2])
    p.disk(0, 3 * MIB, 4 * MIB)
    p.disk(2, 9 * MIB, 8 * MIB)  # an estimate past its total is capped
    struct = p.as_struct(102.5)
    assert (struct["PHASE"], struct["DONE"], struct["TOTAL"]) == ("capture", 11.0 * MIB, 12.0 * MIB)
    assert struct["DISKS"] == [{"DISK_ID": 0, "DONE": 3.0 * MIB, "TOTAL": 4.0 * MIB},
                               {"DISK_ID": 2, "DONE": 8.0 * MIB, "TOTAL": 8.0 * MIB}]
    p.begin(UPLOAD)  # a new phase starts from zero
    assert (p.done, p.total) == (0, 0) and sorted(p.disks) == [0, 2]
    p.files({"disk.0.0": MIB, "vm.xml": 100}, {"disk.0.0": 5 * MIB, "disk.2.0": 6 * MIB, "vm.xml": 100})
    assert (p.disks[0].done, p.disks[0].total, p.disks[2].done, p.disks[2].total) == (MIB, 5 * MIB, 0, 6 * MIB)
    assert (p.done, p.total) == (MIB + 100, 11 * MIB + 100)
    assert isinstance(p.as_struct(103.0)["DONE"], float)  # XML-RPC integers are 32-bit


def test_the_board_finds_a_vms_run_and_forgets_it_when_closed() -> None:
    board = ProgressBoard()
    board.open(1, vm_id=10, now=0.0)
    second = board.open(2, vm_id=11, now=0.0)
    assert board.for_vm(11) is second and board.get(2) is second and board.for_vm(12) is None
    board.close(2)
    assert board.for_vm(11) is None and [p.run_id for p in board] == [1]


def test_metrics_lines_per_disk_and_all() -> None:
    board = ProgressBoard()
    p = board.open(5, vm_id=4, now=0.0)
    p.begin(CAPTURE, [0])
    p.disk(0, 2 * MIB, 8 * MIB)
    lines = progress_lines(board)
    assert f'vmsched_backup_done_bytes{{vm="4",run="5",phase="capture",disk="all"}} {2 * MIB}' in lines
    assert f'vmsched_backup_total_bytes{{vm="4",run="5",phase="capture",disk="0"}} {8 * MIB}' in lines
    assert progress_lines(ProgressBoard()) == [
        "# HELP vmsched_backup_done_bytes bytes done in the running backup's phase",
        "# TYPE vmsched_backup_done_bytes gauge",
        "# HELP vmsched_backup_total_bytes bytes to do in the running backup's phase",
        "# TYPE vmsched_backup_total_bytes gauge"]
