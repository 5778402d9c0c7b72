"""Datastore monitoring: TOTAL_MB, FREE_MB and USED_MB of every backup datastore (spec §5.1, ``monitor``)
and image datastore (scheduler/hosts/imageds.py), every ``MONITORING_INTERVAL_DATASTORE`` seconds and as soon as
a datastore is created or its template changes.

The figures come from ``df`` where BASE_PATH lives (on the backup server, the image datastore's host or
this machine; LIMIT_MB applied) and are stored as plain numbers; ``one.vm.backup`` and restores check the
space they need against them. A datastore that cannot be probed keeps its last figures; the reason is logged once
per change (not every round) and shown in its template as ``MONITOR_ERROR``, removed once a probe works.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from drivers.datastore import Capacity, open_datastore, server_attributes
from drivers.tm import rbdplan
from scheduler.errors import VmschedError
from scheduler.hosts import imageds
from scheduler.hosts.imageds import is_monitored
from scheduler.hosts.links import Daemon
from scheduler.hosts.rounds import RoundMonitor
from scheduler.model.objects.datastore import Datastore
from scheduler.model.objects.states import DatastoreType

log = logging.getLogger(__name__)

KIND = "datastore"
ERROR_KEY = "MONITOR_ERROR"
PROBE_DEADLINE = 60.0  # seconds for one datastore's probe


def watched(datastore: Datastore) -> bool:
    return datastore.type == DatastoreType.BACKUP_DS or is_monitored(datastore)


def reach_of(datastore: Datastore) -> tuple[Any, ...]:
    """What a probe's outcome depends on: a change of these since the probe makes it say nothing."""
    template = datastore.template
    keys = ("BASE_PATH", "LIMIT_MB", "BRIDGE_LIST", "POOL_NAME", *rbdplan.CEPH_KEYS, *server_attributes())
    return (datastore.ds_mad, *(template.get(key) for key in keys))


def recorded(datastore: Datastore, outcome: Capacity | str) -> Datastore | None:
    """``datastore`` with the probe's ``outcome`` (figures, or the reason it failed); None when nothing
    changes (pure)."""
    figures = (datastore.total_mb, datastore.free_mb, datastore.used_mb)
    error = datastore.template.get(ERROR_KEY) or ""
    if isinstance(outcome, Capacity):
        new_figures, new_error = (outcome.total_mb, outcome.free_mb, outcome.used_mb), ""
    else:
        new_figures, new_error = figures, outcome
    if (new_figures, new_error) == (figures, error):
        return None
    datastore.total_mb, datastore.free_mb, datastore.used_mb = new_figures
    if new_error:
        datastore.template.set(ERROR_KEY, new_error)
    else:
        datastore.template.remove(ERROR_KEY)
    return datastore


class DatastoreMonitor(RoundMonitor):
    """Probes the backup datastores in rounds and on change, and records the figures through ``ctx.state``
    (``ctx``: the daemon's ``scheduler.api.Context``; its config is read each round)."""

    def __init__(self, ctx: Daemon, *, deadline: float = PROBE_DEADLINE) -> None:
        super().__init__(ctx)
        self.deadline = deadline
        self._written: dict[int, Datastore] = {}
        self._due: set[int] = set()

    @property
    def interval(self) -> float:
        return float(self.ctx.config.monitoring_interval_datastore)

    def start_round(self) -> None:
        self._due.update(d.id for d in self.ctx.state.datastores.all() if watched(d))

    async def between(self) -> bool:
        due, self._due = sorted(self._due), set()
        await asyncio.gather(*(self.probe(ds_id) for ds_id in due))
        return bool(self._due)

    def on_change(self, kind: str, obj_id: int, obj: Any | None) -> None:
        if kind != KIND:
            return
        if obj is None:
            self._written.pop(obj_id, None)
        elif obj is not self._written.get(obj_id) and watched(obj):
            self._due.add(obj_id)
            self.wake()

    async def probe(self, ds_id: int) -> None:
        """Probe one datastore now and record the outcome."""
        datastore = self.ctx.state.datastores.find(ds_id)
        if datastore is None or not watched(datastore) or self.ctx.links is None:
            return
        outcome: Capacity | str
        try:
            async with asyncio.timeout(self.deadline):
                outcome = await self._capacity(datastore)
        except TimeoutError:
            outcome = f"no answer to monitoring within {self.deadline:g} s"
        except VmschedError as exc:
            outcome = str(exc)
        except Exception as exc:  # a monitoring bug must not stop the monitor: record it and go on
            log.exception("datastore %s: monitoring failed", datastore.name)
            outcome = f"monitoring failed: {exc!r}"
        await self._record(datastore, outcome)

    async def _capacity(self, datastore: Datastore) -> Capacity:
        links = self.ctx.connections("datastores cannot be monitored")
        if is_monitored(datastore):
            return await imageds.monitor(self.ctx.state, links, datastore)
        return await open_datastore(datastore, links.pool).monitor()

    async def _record(self, probed: Datastore, outcome: Capacity | str) -> None:
        state = self.ctx.state
        async with state.lock:
            current = state.datastores.find(probed.id)
            if current is None or reach_of(current) != reach_of(probed):
                return  # deleted or changed since: this probe says nothing any more
            before = current.template.get(ERROR_KEY) or ""
            new = recorded(state.datastores.editable(probed.id), outcome)
            if new is None:
                return
            self._written[new.id] = new
            state.update_soon(KIND, new)
        await state.durable()
        after = new.template.get(ERROR_KEY) or ""
        if after and after != before:
            log.warning("datastore %s (%s): cannot monitor: %s", new.id, new.name, after)
        elif before and not after:
            log.info("datastore %s (%s): monitored again: %d MB free of %d", new.id, new.name, new.free_mb,
                     new.total_mb)
