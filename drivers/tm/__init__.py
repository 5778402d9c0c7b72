"""Transfer drivers (OpenNebula's TM_MAD), one module per kind of disk: ``qcow2`` for file disks.

``qcow2.capture`` stages one ``disk.<disk_id>.<increment>`` per disk on the host for upload (a full copy,
or an increment by changed-block tracking); ``qcow2.recover``
undoes what a capture that died left behind, from its journaled steps. ``plan`` holds their pure parts,
``chaincheck`` the check of an increment's chain before it is taken, ``dirty`` the dirty ranges of a
powered-off disk, ``rbdplan``/``rbddisks`` the Ceph RBD disks (their snapshots, a chain's anchors, full
copies and increment links), ``snapshots`` the overlays an INCREMENT_MODE=SNAPSHOT VM runs on, ``errors`` what they raise.
"""

from __future__ import annotations

from drivers.tm.chaincheck import Increment
from drivers.tm.errors import CaptureError, ChainBroken
from drivers.tm.plan import DiskSource, FsFreeze, Step, fs_freeze, overlay_path, staging_dir, staging_file
from drivers.tm.qcow2 import (
    CaptureOptions,
    CaptureRequest,
    CaptureResult,
    DiskImage,
    RecoveryReport,
    capture,
    fold_snapshots,
    prune_anchors,
    prune_checkpoints,
    recover,
    settle_snapshots,
)

__all__ = [
    "CaptureError", "CaptureOptions", "CaptureRequest", "CaptureResult", "ChainBroken", "DiskImage", "DiskSource", "FsFreeze",
    "Increment", "RecoveryReport", "Step", "capture", "fold_snapshots", "fs_freeze", "overlay_path", "prune_anchors", "prune_checkpoints", "recover",
    "settle_snapshots", "staging_dir", "staging_file",
]
