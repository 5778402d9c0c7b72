"""Typed journal steps: written as the JSON entries recovery has always read, read back typed."""

from __future__ import annotations

import json

import pytest

from scheduler.backup import steps as backup_steps
from scheduler.backup.steps import Process, Staging, Upload
from scheduler.engine.steps import VmStateSaved
from scheduler.restore import steps as restore_steps
from scheduler.restore.steps import Swap, Temp


def test_a_step_is_the_json_entry_of_its_owner() -> None:
    entry = backup_steps.STEPS.entry(Process("server", 3, 4242, "/var/tmp/b/7/9", datastore=100))
    assert entry == {"backup": "process", "side": "server", "host": 3, "pgid": 4242, "marker": "/var/tmp/b/7/9",
                     "datastore": 100}
    assert "datastore" not in backup_steps.STEPS.entry(Process("source", 3, 4242, "/m"))  # unset: not written
    assert restore_steps.STEPS.entry(Temp(0, "/d/a.part")) == {"restore": "temp", "host": 0, "path": "/d/a.part"}


def test_steps_read_back_typed_through_json_in_order_and_only_the_owners() -> None:
    written = [
        backup_steps.STEPS.entry(VmStateSaved(7, 3, 3)),
        {"tm": "qcow2", "step": "overlay", "run": "9", "target": "vda", "path": "/d/vda.vmsched-9.overlay"},
        backup_steps.STEPS.entry(Staging(0, "uuid-1", "/var/tmp/b/7/9")),
        backup_steps.STEPS.entry(Process("source", 0, 11, "/var/tmp/b/7/9")),
        restore_steps.STEPS.entry(Temp(0, "/x")),
        backup_steps.STEPS.entry(Upload(100, 7, "abcdef")),
        backup_steps.STEPS.entry(Staging(1, "uuid-2", "/var/tmp/b/7/10")),
    ]
    entries = json.loads(json.dumps(written))  # as the run's record keeps them
    steps = backup_steps.STEPS
    assert steps.read(entries) == [VmStateSaved(7, 3, 3), Staging(0, "uuid-1", "/var/tmp/b/7/9"),
                                   Process("source", 0, 11, "/var/tmp/b/7/9"), Upload(100, 7, "abcdef"),
                                   Staging(1, "uuid-2", "/var/tmp/b/7/10")]
    assert steps.last(entries, Staging) == Staging(1, "uuid-2", "/var/tmp/b/7/10")
    assert steps.last(entries, Upload) == Upload(100, 7, "abcdef")
    assert restore_steps.STEPS.all(entries, Temp) == [Temp(0, "/x")]
    assert restore_steps.STEPS.last(entries, Swap) is None


def test_a_newer_kind_is_skipped_and_a_damaged_entry_is_an_error() -> None:
    steps = restore_steps.STEPS
    assert steps.read([{"restore": "checkpoint", "host": 0}]) == []  # written by a newer daemon
    with pytest.raises(KeyError):
        steps.read([{"restore": "temp", "host": 0}])  # no path


def test_a_step_of_another_owner_is_refused() -> None:
    with pytest.raises(TypeError, match="Temp is not a backup step"):
        backup_steps.STEPS.entry(Temp(0, "/x"))
