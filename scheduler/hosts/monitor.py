"""Host monitoring: is each hypervisor reachable, what does it run, how much staging space is left.

Every ``MONITORING_INTERVAL_HOST`` seconds (read again each round, so a reload applies) every host that
is not DISABLED or OFFLINE is probed, all in parallel, each under its own deadline. A host is also
probed at once when it is changed through the API (any change not written by the monitor itself, except
allocating an empty host: its settings follow), so a new host does not wait a whole interval.

A probe runs, through the host's command runner and libvirt connection (``scheduler.hosts.links``):

* ``sh -c <fixed script> sh qemu-img rsync ...``: which tools are on the PATH; this is also the
  reachability check (a new SSH connection verifies the host key);
* ``mkdir -p -- BACKUP_BASE_PATH`` and ``df -PB1M -- BACKUP_BASE_PATH``: staging space in MiB;
* libvirt's own version and the hypervisor's (QEMU) version.

What it finds goes into the host TEMPLATE (the keys are :data:`MONITOR_KEYS`):

==================  ===========================================================================
``LIBVIRT_VERSION`` version of the host's libvirt daemon, e.g. ``9.0.0``
``QEMU_VERSION``    version of its hypervisor (QEMU), e.g. ``7.2.0``
``FREE_MB``         free MiB under BACKUP_BASE_PATH (plain number, no unit suffix)
``TOTAL_MB``        size in MiB of the filesystem holding BACKUP_BASE_PATH
``TOOL_QEMU_IMG``   ``YES`` / ``NO``: the tool is on the host's PATH; likewise ``TOOL_RSYNC``,
                    ``TOOL_RESTIC``, ``TOOL_RBD``, ``TOOL_QEMU_NBD``
``CEPH_REACH``      ``YES`` / ``NO``: ``ceph health`` answered within its timeouts, as the host's CEPH_USER,
                    CEPH_KEY, CEPH_CONF, CEPH_HOST say (only for a host with ``rbd`` and a CEPH_CONF or CEPH_HOST);
                    ``CEPH_HEALTH`` what it said, ``CEPH_ERROR`` why it did not. Backups of VMs with RBD disks
                    wait on a host with ``CEPH_REACH = NO``, with that reason
``MONITOR_TIME``    epoch of the last probe, successful or not
``ERROR``           why the last probe failed (removed again by a successful one)
==================  ===========================================================================

A successful probe sets STATE MONITORED and ``MONITORING/TIMESTAMP``; a failed one sets STATE ERROR and
keeps the values of the last success. The engine holds backups of hosts in ERROR and wakes on every host
change, so a host that recovers gets its waiting backups started at once. A state change is logged once.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from drivers import hostkeys
from drivers.commands import HostKeyMismatch
from drivers.datastore import all_hypervisor_tools
from drivers.sshtarget import host_pattern
from drivers.tm import rbdplan
from drivers.tm.rbdplan import RbdAccess
from scheduler.errors import DriverError, VmschedError
from scheduler.hosts.links import Daemon, is_local, ssh_target
from scheduler.hosts.rounds import RoundMonitor
from scheduler.hosts.vmsync import VmStateSync
from scheduler.model.objects.host import Host
from scheduler.model.objects.states import HostState

log = logging.getLogger(__name__)

KIND = "host"
# What every driver may run on a hypervisor, and the tools Ceph disks and NBD exports will need.
TOOLS = tuple(dict.fromkeys(("qemu-img", *all_hypervisor_tools(), "rbd", "qemu-nbd")))
# Fixed text: the tool names arrive as positional arguments, never inside the script.
TOOLS_SCRIPT = 'for tool in "$@"; do if command -v "$tool" >/dev/null 2>&1; then echo "$tool"; fi; done'
PROBE_DEADLINE = 30.0  # seconds one host's probe may take, connecting included
REACH_KEYS = ("SSH_HOST", "SSH_PORT", "SSH_USER", "SSH_KEY", "LIBVIRT_URI")
UNWATCHED = frozenset({HostState.DISABLED, HostState.OFFLINE})


def tool_key(tool: str) -> str:
    """The TEMPLATE key telling whether ``tool`` is present: ``qemu-img`` -> ``TOOL_QEMU_IMG``."""
    return "TOOL_" + tool.upper().replace("-", "_")


CEPH_KEYS = ("CEPH_REACH", "CEPH_HEALTH", "CEPH_ERROR")
MONITOR_KEYS = ("LIBVIRT_VERSION", "QEMU_VERSION", "FREE_MB", "TOTAL_MB", *map(tool_key, TOOLS), *CEPH_KEYS,
                "MONITOR_TIME", "ERROR")
REPLACE_HINT = ("if the host really has a new key, check its fingerprint, remove the old one with "
                "`ssh-keygen -R {pattern} -f {known_hosts}` and accept the new one with "
                "`vmsched host accept-hostkey HOST`")


@dataclass(frozen=True)
class DiskSpace:
    total_mb: int
    free_mb: int


@dataclass(frozen=True)
class CephReach:
    """Whether the host reached its Ceph cluster: ``ceph health``'s answer, or why there was none."""

    health: str = ""
    error: str = ""


@dataclass(frozen=True)
class Probe:
    """What one successful probe found on a host."""

    libvirt_version: str
    qemu_version: str
    space: DiskSpace
    tools: frozenset[str]
    ceph: CephReach | None = None  # None: the host names no cluster of its own, or has no rbd


def host_ceph_access(host: Host) -> RbdAccess | None:
    """How the host reaches its Ceph cluster, when its template names one (CEPH_CONF or CEPH_HOST)."""
    access = rbdplan.access_from({key: host.template.get(key) or "" for key in rbdplan.CEPH_KEYS})
    return access if access.conf or access.mon_hosts else None



# -- pure parts ------------------------------------------------------------------------------------

_DF_LINE = re.compile(r"^(?P<fs>.*?)\s+(?P<total>\d+)\s+(?P<used>\d+)\s+(?P<free>\d+)\s+(?:\d+%|-)\s+(?P<mount>.*)$")


def tools_argv() -> list[str]:
    return ["sh", "-c", TOOLS_SCRIPT, "sh", *TOOLS]


def parse_tools(stdout: str) -> frozenset[str]:
    """The tools the script found: one name per line; anything else is ignored."""
    return frozenset(line.strip() for line in stdout.splitlines() if line.strip() in TOOLS)


def parse_df(stdout: str) -> DiskSpace:
    """Total and available MiB from ``df -PB1M PATH`` (a header line, then one line for PATH)."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    match = _DF_LINE.match(lines[-1].strip()) if len(lines) >= 2 else None
    if match is None:
        raise DriverError(f"unexpected df output: {stdout.strip()[:200]!r}")
    return DiskSpace(total_mb=int(match["total"]), free_mb=int(match["free"]))


def watched(host: Host) -> bool:
    """Hosts an operator disabled or took offline are left alone."""
    return host.state not in UNWATCHED


def just_allocated(host: Host) -> bool:
    """Allocated, nothing set yet: its SSH settings usually follow at once (``vmsched host create``), so
    a probe now would only try the scheduler's own machine. The next round takes it if nothing follows."""
    return host.state == HostState.INIT and len(host.template) == 0


def reach_of(host: Host) -> tuple[str | None, ...]:
    """The settings that decide how a host is reached; a probe made with other settings is stale."""
    return tuple(host.template.get(key) for key in REACH_KEYS)


def _moved(host: Host, state: HostState, template: Any, monitored_at: int) -> Host:
    prev_state = host.state if state != host.state else host.prev_state
    return replace(host, state=state, prev_state=prev_state, template=template, monitored_at=monitored_at)


def record_success(host: Host, probe: Probe, now: int) -> Host:
    """A copy of ``host``, MONITORED, with what ``probe`` found; ``host`` itself is not changed."""
    template = host.template.copy()
    template.remove("ERROR")
    template.set("LIBVIRT_VERSION", probe.libvirt_version)
    template.set("QEMU_VERSION", probe.qemu_version)
    template.set("FREE_MB", probe.space.free_mb)
    template.set("TOTAL_MB", probe.space.total_mb)
    for tool in TOOLS:
        template.set(tool_key(tool), "YES" if tool in probe.tools else "NO")
    for key in CEPH_KEYS:
        template.remove(key)
    if probe.ceph is not None:
        template.set("CEPH_REACH", "NO" if probe.ceph.error else "YES")
        template.set("CEPH_HEALTH" if not probe.ceph.error else "CEPH_ERROR",
                     " ".join((probe.ceph.error or probe.ceph.health).split())[:500] or "-")
    template.set("MONITOR_TIME", now)
    return _moved(host, HostState.MONITORED, template, now)


def record_failure(host: Host, reason: str, now: int) -> Host:
    """A copy of ``host`` in ERROR with ``reason`` in TEMPLATE/ERROR; the last values found are kept."""
    template = host.template.copy()
    template.set("ERROR", " ".join(reason.split()) or "monitoring failed")
    template.set("MONITOR_TIME", now)
    return _moved(host, HostState.ERROR, template, host.monitored_at)


def change_message(old: Host, new: Host) -> str | None:
    """What to log about a host moving from ``old`` to ``new``: only state changes, so a host that stays
    down (even for changing reasons: refused, then timed out) is logged once; TEMPLATE/ERROR has the latest."""
    if new.state == old.state:
        return None
    if new.state == HostState.ERROR:
        return f"host {new.name}: ERROR: {new.template.get('ERROR')}"
    if old.state == HostState.ERROR:
        return f"host {new.name}: recovered, {new.state.name}"
    return f"host {new.name}: {new.state.name} (libvirt {new.template.get('LIBVIRT_VERSION')}, " \
           f"QEMU {new.template.get('QEMU_VERSION')}, {new.template.get('FREE_MB')} MiB free)"


def explain(exc: BaseException, host: Host, known_hosts: Any) -> str:
    """The ERROR text for a failed probe; a changed host key also names the recorded keys and the way out."""
    text = str(exc) or type(exc).__name__
    if not isinstance(exc, HostKeyMismatch) or is_local(host.template):
        return text
    target = ssh_target(host.name, host.template)
    recorded = hostkeys.known_keys(known_hosts, target.host, target.port)
    if recorded:
        text += f" (recorded: {', '.join(hostkeys.describe(key) for key in recorded)})"
    pattern = host_pattern(target.host, target.port)
    return f"{text}; {REPLACE_HINT.format(pattern=repr(pattern), known_hosts=known_hosts)}"


# -- probing ---------------------------------------------------------------------------------------


def _text(result: Any) -> str:
    stdout: bytes = result.stdout
    return stdout.decode("utf-8", "replace")


CEPH_TIMEOUTS = rbdplan.RbdTimeouts(mount=10.0, mon_op=10.0, osd_op=10.0)  # within PROBE_DEADLINE


async def probe_host(runner: Any, vmm: Any, base_path: str, *, timeout: float,  # noqa: ASYNC109
                     ceph: RbdAccess | None = None) -> Probe:
    """Probe one host through its runner (``drivers.commands.Runner``) and libvirt (``KvmHost``); with ``ceph``,
    also whether it reaches that cluster (never a failure of the probe: the host serves its file disks)."""
    tools = parse_tools(_text(await runner.run(tools_argv(), timeout=timeout)))
    await runner.run(["mkdir", "-p", "--", base_path], timeout=timeout)
    space = parse_df(_text(await runner.run(["df", "-PB1M", "--", base_path], timeout=timeout)))
    versions = await vmm.versions()
    reach = None
    if ceph is not None and "rbd" in tools:
        reach = await ceph_reach(runner, ceph, timeout)
    return Probe(versions.libvirt, versions.qemu, space, tools, reach)


async def ceph_reach(runner: Any, access: RbdAccess, timeout: float) -> CephReach:  # noqa: ASYNC109
    try:
        result = await runner.run(rbdplan.health_argv(access, CEPH_TIMEOUTS), timeout=timeout)
    except DriverError as exc:
        tail = getattr(exc, "stderr_tail", "") or str(exc)
        lines = [line for line in tail.splitlines() if line.strip()]
        return CephReach(error=lines[-1] if lines else "ceph health failed")
    return CephReach(health=_text(result).strip())


class HostMonitor(RoundMonitor):
    """Probes hosts in rounds and on change, and records the outcome through ``ctx.state``.

    ``ctx`` is the daemon's ``scheduler.api.Context``: its ``state``, ``config`` (read each round),
    ``clock`` and ``links``. At most one probe per host runs at a time; a change arriving meanwhile
    queues one more.
    """

    def __init__(self, ctx: Daemon, *, deadline: float = PROBE_DEADLINE) -> None:
        super().__init__(ctx)
        self.deadline = deadline
        self._running: dict[int, asyncio.Task[None]] = {}
        self._again: set[int] = set()
        self._written: dict[int, Host] = {}
        self.vm_states = VmStateSync(ctx)

    @property
    def interval(self) -> float:
        return float(self.ctx.config.monitoring_interval_host)

    def start_round(self) -> None:
        self.monitor_all()

    async def stopped(self) -> None:
        await self._cancel_probes()

    def monitor_all(self) -> None:
        for host in self.ctx.state.hosts.all():
            if watched(host):
                self.monitor(host.id)

    def monitor(self, host_id: int) -> None:
        """Probe ``host_id`` now, or right after the probe already running for it."""
        if host_id in self._running:
            self._again.add(host_id)
            return
        task = asyncio.get_running_loop().create_task(self._probe_and_record(host_id), name=f"monitor-host-{host_id}")
        self._running[host_id] = task
        task.add_done_callback(lambda _: self._finished(host_id))

    async def settled(self) -> None:
        """Wait until no probe is running or queued."""
        while self._running:
            await asyncio.gather(*self._running.values(), return_exceptions=True)

    def _finished(self, host_id: int) -> None:
        self._running.pop(host_id, None)
        if host_id in self._again:
            self._again.discard(host_id)
            self.monitor(host_id)

    async def _cancel_probes(self) -> None:
        self._again.clear()
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def on_change(self, kind: str, obj_id: int, obj: Any | None) -> None:
        if kind != KIND:
            return
        if obj is None:
            self._written.pop(obj_id, None)
            if self.ctx.links is not None:
                self.ctx.links.forget(obj_id)
        elif obj is not self._written.get(obj_id) and watched(obj) and not just_allocated(obj):
            self.monitor(obj_id)

    async def _probe_and_record(self, host_id: int) -> None:
        host = self.ctx.state.hosts.find(host_id)
        if host is None or not watched(host):
            return
        change = await self._probe(host)
        await self._record(host, change)

    async def _probe(self, host: Host) -> Callable[[Host], Host]:
        links = self.ctx.connections("hosts cannot be monitored")
        try:
            async with asyncio.timeout(self.deadline):
                probe = await probe_host(links.runner(host), links.vmm(host), str(self.ctx.config.backup_base_path),
                                         timeout=self.deadline, ceph=host_ceph_access(host))
        except TimeoutError:
            reason = f"no answer to monitoring within {self.deadline:g} s"
        except VmschedError as exc:
            reason = explain(exc, host, links.settings.known_hosts)
        except Exception as exc:  # a monitoring bug must not stop the monitor: record it and go on
            log.exception("host %s: monitoring failed", host.name)
            reason = f"monitoring failed: {exc!r}"
        else:
            await self._sync_vms(host)
            return lambda current: record_success(current, probe, self.ctx.now())
        return lambda current: record_failure(current, reason, self.ctx.now())

    async def _sync_vms(self, host: Host) -> None:
        """The VMs' states from libvirt (a failure here does not make the host ERROR)."""
        try:
            async with asyncio.timeout(self.deadline):
                await self.vm_states.poll(host)
        except (TimeoutError, VmschedError) as exc:
            log.warning("host %s: VM states not refreshed: %s", host.name, exc)
        except Exception:  # a bug here must not stop monitoring
            log.exception("host %s: VM states not refreshed", host.name)

    async def _record(self, probed: Host, change: Callable[[Host], Host]) -> None:
        state = self.ctx.state
        async with state.lock:
            current = state.hosts.find(probed.id)
            if current is None or not watched(current) or reach_of(current) != reach_of(probed):
                return  # deleted, disabled or reached differently since: this probe says nothing any more
            new = change(current)
            self._written[new.id] = new
            state.update_soon(KIND, new)
        await state.durable()
        message = change_message(current, new)
        if message:
            (log.warning if new.state == HostState.ERROR else log.info)("%s", message)
