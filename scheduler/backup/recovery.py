"""After a crash of the daemon: what an interrupted backup run journaled is undone at start-up.

Processes it left are killed (on the hypervisor and the backup server), the guest is resumed or thawed
and its overlays committed back (the transfer driver's recovery), the staging dir and a partial or
unrecorded upload are removed, and the VM's state is put back.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import PurePosixPath
from typing import Any

from drivers import tm
from drivers.commands import Runner
from drivers.datastore import (
    open_datastore,
    remove_leftovers,
    run_label,
)
from drivers.processes import kill_marked
from scheduler.backup.run import remove_staging, restore_state
from scheduler.backup.steps import STEPS, Process, Staging, Upload, VmStateSaved
from scheduler.backup.transport import COMMAND_TIMEOUT
from scheduler.hosts.links import HostLinks
from scheduler.model.objects.states import LcmState, VmState
from scheduler.store.state import State

log = logging.getLogger(__name__)


def make_recoverer(state: State, links: HostLinks) -> Callable[[Any], Awaitable[None]]:
    """The engine's ``recoverer``: undo what an interrupted backup run journaled, then forget its steps."""

    async def recover(run: Any) -> None:
        steps = list(run.steps)
        if not steps:
            return
        problems = [p for p in (await _recover_processes(state, links, run, steps),
                                await _recover_host(state, links, run, steps),
                                await _recover_upload(state, links, steps),
                                await _recover_state(state, steps)) if p]
        if problems:
            log.error("run %s: recovery incomplete: %s", run.id, "; ".join(problems))
        else:
            run.steps = []

    return recover


async def _recover_processes(state: State, links: HostLinks, run: Any, steps: list[dict[str, Any]]) -> str:
    """Kill the converts, copies and hashes the run left running: on every machine it journaled a process
    on, and on its hypervisor, every process group naming its staging directory (see drivers.processes)."""
    staged = STEPS.last(steps, Staging)
    if staged is None or links is None:
        return ""
    marker = staged.path
    machines = {("source", staged.host): None}
    for process in STEPS.all(steps, Process):
        on = process.datastore if process.side == "server" else process.host
        if on is not None:
            machines[(process.side, on)] = None
    problems = []
    for side, object_id in machines:
        try:
            runner = _process_runner(state, links, side, object_id)
            killed = await kill_marked(runner, marker) if runner is not None else []
            if killed:
                log.warning("run %s: killed process group(s) %s it left running (%s side)", run.id,
                            ", ".join(map(str, killed)), side)
            if runner is not None and side == "source":  # e.g. the password file a killed restic left
                await remove_leftovers(runner, run_label(marker, run.vm_id), COMMAND_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - every part of the recovery is tried
            problems.append(f"processes of {marker} ({side} side): {exc}")
    return "; ".join(problems)



def _process_runner(state: State, links: HostLinks, side: str, object_id: int) -> Runner | None:
    """The runner of the machine a run's process ran on: the hypervisor, or the datastore's server."""
    if side == "server":
        datastore = state.datastores.find(object_id)
        return open_datastore(datastore, links.pool).server if datastore is not None else None
    host = state.hosts.find(object_id)
    return links.runner(host) if host is not None else None


async def _recover_host(state: State, links: HostLinks, run: Any, steps: list[dict[str, Any]]) -> str:
    """Guest resumed/thawed, overlays committed back, staged files and the staging dir removed."""
    staged = STEPS.last(steps, Staging)
    if staged is None or links is None:
        return ""
    host = state.hosts.find(staged.host)
    if host is None:
        return f"host {staged.host} of the staging dir {staged.path} is not registered any more"
    runner = links.runner(host)
    try:
        report = await tm.recover(links.vmm(host), runner, staged.domain, steps)
        log.info("run %s: recovered on %s: %s", run.id, host.name, report)
    except Exception as exc:  # noqa: BLE001 - every part of the recovery is tried
        return str(exc)
    if PurePosixPath(staged.path).name == str(run.id):  # only the run's own dir
        await remove_staging(runner, staged.path)
    return ""


async def _recover_upload(state: State, links: HostLinks, steps: list[dict[str, Any]]) -> str:
    """Partial uploads removed; a complete upload that no image records removed too."""
    upload = STEPS.last(steps, Upload)
    if upload is None or links is None:
        return ""
    datastore = state.datastores.find(upload.datastore)
    if datastore is None:
        return f"datastore {upload.datastore} is not registered any more"
    store = open_datastore(datastore, links.pool)
    vm_id, backup_id = upload.vm, upload.backup_id
    try:
        await store.cleanup_partial(vm_id)
        recorded = any(backup_id in i.sources and i.datastore_id == datastore.id for i in state.images.all())
        if not recorded and await store.exists(vm_id, backup_id):
            await store.rm(vm_id, [backup_id])
    except Exception as exc:  # noqa: BLE001 - every part of the recovery is tried
        return str(exc)
    return ""


async def _recover_state(state: State, steps: list[dict[str, Any]]) -> str:
    saved = STEPS.last(steps, VmStateSaved)
    if saved is not None:
        await restore_state(state, saved.vm, (VmState(saved.state), LcmState(saved.lcm)))
    return ""
