"""The VM pool as the ``vm`` commands read it: its kind, the LCM states of a backup, a running backup's progress."""

from __future__ import annotations

from scheduler.cli.context import FILTER_ALL, Context, Kind
from scheduler.cli.progress import Progress
from scheduler.errors import VmschedError

ANY_BUT_DONE = -1
VMS = Kind("VM", "one.vmpool.info", "VM_POOL", "VM", (FILTER_ALL, -1, -1, ANY_BUT_DONE))


BACKUP_LCM_STATES = frozenset({"BACKUP", "BACKUP_POWEROFF"})


def backup_progress(ctx: Context, vm_id: int) -> Progress | None:
    """The PROGRESS of the VM's running backup; None when none runs or the daemon cannot tell."""
    try:
        return Progress.from_struct(ctx.call("vmsched.vm.backupprogress", vm_id))
    except VmschedError:  # a daemon without the method, or the run ended meanwhile
        return None
