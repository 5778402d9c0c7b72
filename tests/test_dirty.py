"""The pure part of a powered-off VM's increments (drivers.tm.dirty): the dirty ranges and the copies."""

from __future__ import annotations

import json

import pytest

from drivers.tm import dirty
from scheduler.errors import ValidationError

MiB = 1 << 20


def test_dirty_ranges_are_the_ones_the_nbd_client_shows_without_data_joined_when_adjacent() -> None:
    reply = json.dumps([
        {"start": 0, "length": 16 * MiB, "data": True},
        {"start": 16 * MiB, "length": MiB, "data": False},
        {"start": 17 * MiB, "length": 64 * 1024, "data": False},
        {"start": 17 * MiB + 64 * 1024, "length": 20 * MiB, "data": True},
        {"start": 40 * MiB, "length": 64 * 1024, "data": False},
    ])
    assert dirty.dirty_extents(reply) == [(16 * MiB, MiB + 64 * 1024), (40 * MiB, 64 * 1024)]
    assert dirty.dirty_bytes(dirty.dirty_extents(reply)) == MiB + 128 * 1024
    with pytest.raises(ValidationError, match="dirty ranges"):
        dirty.dirty_extents("not json")


def test_reads_are_cut_at_the_chunk_and_batched_per_qemu_io() -> None:
    commands = dirty.read_commands([(0, 150 * MiB), (200 * MiB, 4096)])
    assert commands == [f"read -q 0 {64 * MiB}", f"read -q {64 * MiB} {64 * MiB}", f"read -q {128 * MiB} {22 * MiB}",
                        f"read -q {200 * MiB} 4096"]
    argvs = dirty.copy_argvs("/s/disk.0.1", [f"read -q {i} 1" for i in range(dirty.READS_PER_CALL + 1)])
    assert len(argvs) == 2 and argvs[0][:4] == ["qemu-io", "-C", "-f", "qcow2"] and argvs[1][-1] == "/s/disk.0.1"
    assert argvs[1][4:6] == ["-c", f"read -q {dirty.READS_PER_CALL} 1"]


def test_the_map_script_gets_every_value_as_a_parameter() -> None:
    argv = dirty.map_argv("/s/nbd.0.sock", "/s/nbd.0.pid", "vmsched-5-0", "/d/x y.qcow2")
    assert argv[:2] == ["sh", "-c"] and argv[3:] == ["sh", "/s/nbd.0.sock", "/s/nbd.0.pid", "vmsched-5-0", "/d/x y.qcow2"]
    assert "x y" not in argv[2]
