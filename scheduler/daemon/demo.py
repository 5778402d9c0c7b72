"""The demo ``vmsched serve`` sets up on a fresh state, so that the first start shows a backup happening.

It registers this machine as a host (no ``SSH_HOST``: the local runner and ``qemu:///system``), an ``fs``
backup datastore under ``<state_dir>/backups``, and one tiny TCG domain (no OS, a qcow2 ``vda`` and a raw
``vdb`` under ``<state_dir>/demo``) defined and started in the local libvirt and imported as a VM with
``BACKUP_CONFIG = [ KEEP_LAST = "3", FS_FREEZE = "NONE" ]`` and an hourly backup ``SCHED_ACTION`` whose
first occurrence is now. Everything goes through the API's own methods, as ``oneadmin``.

It runs only when the state has no host yet, or has the demo's own host from an earlier start that did not
finish (``VMSCHED_DEMO = "SETTING_UP"`` in its template; ``"DONE"`` once finished): each step finds what an
earlier start made before making it, and a finished demo is only checked, so a second start with the same
state creates nothing (not even what the user has removed from the demo since). The domain's name carries
a hash of the state directory, so two state directories never share a domain. A failure (no libvirt, no
qemu-img, ...) is logged once with what is missing and the switch that skips the demo; the daemon keeps
serving.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import pwd
import re
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from xml.sax.saxutils import escape, quoteattr

import libvirt

from drivers.vmm import LOCAL_URI
from drivers.vmm.domainxml import parse_disks
from scheduler.api.context import Context
from scheduler.api.permissions import Caller
from scheduler.api.registry import registry
from scheduler.api.rpc import coerce_args
from scheduler.errors import ActionError, VmschedError
from scheduler.model.objects.host import Host
from scheduler.model.objects.states import VmState
from scheduler.model.objects.user import ADMIN_GROUP
from scheduler.model.objects.vm import Vm

log = logging.getLogger(__name__)
T = TypeVar("T")

HOST_NAME = "localhost"
DATASTORE_NAME = "demo-backups"
DOMAIN_PREFIX = "vmsched-demo-"
MARK, SETTING_UP, DONE = "VMSCHED_DEMO", "SETTING_UP", "DONE"  # on the demo's host: how far it got
SWITCH = "`vmsched serve --no-demo` or `make run DEMO=0`"
DISKS = (("vda", "vda.qcow2", "qcow2", 64), ("vdb", "vdb.raw", "raw", 32))  # target, file, format, MiB
BACKUP_CONFIG = 'BACKUP_CONFIG = [ KEEP_LAST = "3", FS_FREEZE = "NONE" ]'
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
DEFAULT_QEMU_USER = "libvirt-qemu"  # Debian's libvirt, when qemu.conf does not say
STEP_TIMEOUT = 60.0  # seconds for each command or libvirt call


class DemoUnavailable(ActionError):
    """Something the demo needs is missing on this machine."""


def domain_name(state_dir: Path) -> str:
    """The demo domain of ``state_dir``: one per state directory (pure)."""
    return DOMAIN_PREFIX + hashlib.sha256(str(state_dir.absolute()).encode()).hexdigest()[:8]


def disk_paths(state_dir: Path) -> dict[str, Path]:
    return {target: state_dir / "demo" / file for target, file, _, _ in DISKS}


def domain_xml(name: str, disks: dict[str, Path]) -> str:
    """A TCG domain without an OS (it idles in the BIOS) with the demo's two disks (pure)."""
    devices = "".join(
        f"    <disk type='file' device='disk'><driver name='qemu' type='{fmt}'/>"
        f"<source file={quoteattr(str(disks[target]))}/><target dev='{target}' bus='virtio'/></disk>\n"
        for target, _, fmt, _ in DISKS)
    return f"""\
<domain type='qemu'>
  <name>{escape(name)}</name>
  <description>vmsched demo VM: no OS, backed up every hour (vmsched serve --no-demo skips it)</description>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>
  <devices>
{devices}    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def disk_sources(xml: str) -> dict[str, Path]:
    """Source file of each file-backed disk of a domain XML (pure)."""
    return {disk.target: Path(disk.path) for disk in parse_disks(xml) if disk.type == "file" and disk.path}


def qemu_user(conf: str | None) -> str:
    """The account QEMU runs as, from the text of qemu.conf (its last ``user`` line wins) (pure)."""
    user = DEFAULT_QEMU_USER
    for line in (conf or "").splitlines():
        match = re.match(r'\s*user\s*=\s*"([^"]*)"', line)
        if match:
            user = match.group(1)
    return user


def can_enter(mode: int, owner: int, group: int, uid: int, gids: set[int]) -> bool:
    """Whether ``uid`` (in ``gids``) may search a directory with this mode and ownership (pure)."""
    if uid == 0:
        return True
    if owner == uid:
        return bool(mode & stat.S_IXUSR)
    return bool(mode & (stat.S_IXGRP if group in gids else stat.S_IXOTH))


# -- the API, called as oneadmin over the daemon's own context ------------------------------------------


def admin(ctx: Context) -> Caller:
    user = next((u for u in ctx.state.users.all() if u.name == "oneadmin"), None)
    user_id = user.id if user is not None else 0
    return Caller(user_id, "oneadmin", ADMIN_GROUP, frozenset([ADMIN_GROUP]))


async def call(ctx: Context, method: str, *args: Any) -> Any:
    """An API method through its handler, as ``oneadmin`` (the same checks as an XML-RPC call)."""
    handler = registry.methods[method]
    return await handler.handler(ctx, admin(ctx), *coerce_args(handler, args))


# -- what an earlier start made ---------------------------------------------------------------------------


def demo_host(ctx: Context) -> Host | None:
    marked = (h for h in ctx.state.hosts.all() if h.template.get(MARK) in (SETTING_UP, DONE))
    return next((h for h in marked if h.name == HOST_NAME), None)


def demo_vm(ctx: Context, host: Host, name: str) -> Vm | None:
    return next((vm for vm in ctx.state.vms.all() if vm.deploy_id == name and vm.state != VmState.DONE
                 and vm.host is not None and vm.host[0] == host.id), None)


def has_backup_action(ctx: Context, vm: Vm) -> bool:
    actions = (ctx.state.schedactions.find(sa_id) for sa_id in vm.sched_actions)
    return any(a is not None and a.action == "backup" for a in actions)


# -- the steps --------------------------------------------------------------------------------------------


async def provision(ctx: Context) -> None:
    """Set the demo up (or find it set up). Never raises: a failure is one error line in the log."""
    try:
        await _provision(ctx)
    except VmschedError as exc:
        log.error("demo: not set up: %s. `make run` starts the local libvirt (scripts/local-libvirt up); "
                  "skip the demo with %s", exc, SWITCH)
    except Exception:  # the demo must never take the daemon down with it
        log.exception("demo: not set up (unexpected error); the daemon carries on. Skip the demo with %s", SWITCH)


async def _provision(ctx: Context) -> None:
    host = demo_host(ctx)
    name = domain_name(ctx.state_dir)
    if host is None and ctx.state.hosts.all():
        log.info("demo: skipped: the state already has hosts (%s)", ", ".join(h.name for h in ctx.state.hosts.all()))
        return
    if host is not None and host.template.get(MARK) == DONE:
        await _check_existing(ctx, host, name)
        return
    log.info("demo: %s this machine as a host, a backup datastore and one tiny VM (%s skips it)",
             "setting up" if host is None else "finishing the set-up of", SWITCH)
    await preflight()
    host = host or await _create_host(ctx)
    await _datastore(ctx)
    vm = demo_vm(ctx, host, name)
    vm_id = vm.id if vm is not None else await _import(ctx, host, await _domain(ctx, name), name)
    await _schedule(ctx, vm_id)
    await call(ctx, "one.host.update", host.id, f'{MARK} = "{DONE}"', 1)
    log.info("demo: ready; follow the backup with `vmsched vm show %s`", vm_id)


async def preflight() -> None:
    """What the demo needs, checked before anything is created."""
    for tool, package in (("qemu-img", "qemu-utils"), ("qemu-system-x86_64", "qemu-system-x86")):
        if shutil.which(tool) is None:
            raise DemoUnavailable(f"{tool} is missing (Debian package {package}; scripts/setup.sh installs it)")
    try:
        await _in_thread(lambda: libvirt.open(LOCAL_URI).close(), f"the local libvirt ({LOCAL_URI}) does not answer")
    except ActionError as exc:
        raise DemoUnavailable(str(exc)) from None


async def _create_host(ctx: Context) -> Host:
    host_id = await call(ctx, "one.host.allocate", HOST_NAME, "kvm", "kvm", -1)
    await call(ctx, "one.host.update", host_id, f'{MARK} = "{SETTING_UP}"', 1)
    log.info("demo: host %s %s: this machine (commands run locally, libvirt %s)", host_id, HOST_NAME, LOCAL_URI)
    return ctx.state.hosts.get(host_id)


async def _datastore(ctx: Context) -> int:
    existing = next((d for d in ctx.state.datastores.all() if d.name == DATASTORE_NAME), None)
    if existing is not None:
        return int(existing.id)
    base = ctx.state_dir / "backups"
    base.mkdir(mode=0o700, exist_ok=True)
    ds_id = await call(ctx, "one.datastore.allocate",
                       f'NAME = "{DATASTORE_NAME}"\nTYPE = "BACKUP_DS"\nDS_MAD = "fs"\nBASE_PATH = "{base}"', -1)
    log.info("demo: backup datastore %s %s: fs in %s", ds_id, DATASTORE_NAME, base)
    return int(ds_id)


async def _domain(ctx: Context, name: str) -> str:
    """The demo's disks and its domain, defined and running; its UUID."""
    disks = disk_paths(ctx.state_dir)
    await _make_disks(ctx, disks)
    open_to_qemu(ctx.state_dir, disks)
    uuid, created = await _in_thread(lambda: ensure_domain(name, disks), f"libvirt domain {name}")
    log.info("demo: libvirt domain %s %s and running (TCG, 64 MiB, no OS)", name, "defined" if created else "found")
    return uuid


async def _make_disks(ctx: Context, disks: dict[str, Path]) -> None:
    next(iter(disks.values())).parent.mkdir(mode=0o755, exist_ok=True)
    for target, _, fmt, size in DISKS:
        path = disks[target]
        if path.exists():
            continue
        await ctx.connections("the demo needs them").local.run(["qemu-img", "create", "-q", "-f", fmt, str(path), f"{size}M"],
                                  timeout=STEP_TIMEOUT)
        log.info("demo: disk %s: %s, %s MiB %s", target, path, size, fmt)


def open_to_qemu(state_dir: Path, disks: dict[str, Path]) -> None:
    """Let QEMU, as this machine's libvirt runs it, open the disks: nothing to do when it runs as root;
    otherwise the disks become its own and the (0700) state directory lets its group pass through."""
    conf = QEMU_CONF.read_text() if QEMU_CONF.is_file() else None
    user = qemu_user(conf)
    try:
        account = pwd.getpwuid(int(user[1:])) if user.startswith("+") else pwd.getpwnam(user)
    except (KeyError, ValueError):
        raise DemoUnavailable(f"QEMU's user {user!r} ({QEMU_CONF}) does not exist") from None
    if account.pw_uid == 0:
        return
    gids = set(os.getgrouplist(account.pw_name, account.pw_gid))
    for path in disks.values():
        os.chown(path, account.pw_uid, account.pw_gid)
    info = state_dir.stat()
    if not can_enter(info.st_mode, info.st_uid, info.st_gid, account.pw_uid, gids):
        os.chown(state_dir, -1, account.pw_gid)
        os.chmod(state_dir, stat.S_IMODE(info.st_mode) | stat.S_IXGRP)
        log.info("demo: %s: group %s may pass through (QEMU runs as %s)", state_dir, account.pw_gid, user)
    for parent in state_dir.absolute().parents:
        info = parent.stat()
        if not can_enter(info.st_mode, info.st_uid, info.st_gid, account.pw_uid, gids):
            raise DemoUnavailable(f"QEMU runs as {user} ({QEMU_CONF}) and cannot enter {parent}, above the state "
                                  "directory: choose a state directory it can reach")


def ensure_domain(name: str, disks: dict[str, Path]) -> tuple[str, bool]:
    """Define (unless it exists with these disks) and start the domain; (UUID, whether it was defined).
    Blocking: runs in a thread."""
    conn = libvirt.open(LOCAL_URI)
    try:
        try:
            dom, created = conn.lookupByName(name), False
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise
            dom, created = conn.defineXML(domain_xml(name, disks)), True
        if not created and disk_sources(dom.XMLDesc()) != disks:
            raise DemoUnavailable(f"libvirt domain {name} exists with other disks; remove it (virsh undefine {name})")
        if not dom.isActive():
            dom.create()
        return dom.UUIDString(), created
    finally:
        conn.close()


async def _import(ctx: Context, host: Host, uuid: str, name: str) -> int:
    [result] = await call(ctx, "one.host.importvm", host.id, [uuid], False)
    if result["STATUS"] == "failed":
        raise ActionError(f"domain {name} could not be imported: {result['MESSAGE']}")
    log.info("demo: VM %s imported from libvirt domain %s", result["ID"], name)
    return int(result["ID"])


async def _schedule(ctx: Context, vm_id: int) -> None:
    vm = ctx.state.vms.get(vm_id)
    if has_backup_action(ctx, vm):
        return
    ds = next(d for d in ctx.state.datastores.all() if d.name == DATASTORE_NAME)
    await call(ctx, "one.vm.updateconf", vm_id, BACKUP_CONFIG, 1)
    now = ctx.now()
    sa_id = await call(ctx, "one.vm.schedadd", vm_id,
                       f'SCHED_ACTION = [ ACTION = "backup", ARGS = "{ds.id}", TIME = "{now}", REPEAT = "3", '
                       'DAYS = "1", END_TYPE = "0" ]')
    log.info("demo: VM %s: %s; scheduled action %s backs it up to datastore %s every hour, the first time now",
             vm_id, BACKUP_CONFIG, sa_id, ds.id)


async def _check_existing(ctx: Context, host: Host, name: str) -> None:
    """A restart after the demo was set up: say whether its VM and domain are still there; create nothing."""
    vm = demo_vm(ctx, host, name)
    if vm is None:
        log.info("demo: set up earlier and its VM has been removed since; nothing to create")
        return
    try:
        await _in_thread(lambda: _lookup(vm.uuid or name), f"libvirt domain {name}")
    except ActionError as exc:
        log.warning("demo: VM %s: %s; its backups fail until the domain is back. `vmsched vm delete %s` removes "
                    "the VM", vm.id, exc, vm.id)
        return
    log.info("demo: already set up: VM %s (libvirt domain %s); nothing to create", vm.id, name)


def _lookup(ref: str) -> None:
    conn = libvirt.open(LOCAL_URI)
    try:
        if len(ref) == 36:
            conn.lookupByUUIDString(ref)
        else:
            conn.lookupByName(ref)
    finally:
        conn.close()


async def _in_thread(fn: Callable[[], T], what: str) -> T:
    """A blocking libvirt call off the event loop, under a deadline; its failure as an ActionError."""
    libvirt.registerErrorHandler(lambda *_: None, None)  # errors arrive as exceptions, not on stderr
    try:
        async with asyncio.timeout(STEP_TIMEOUT):
            return await asyncio.to_thread(fn)
    except libvirt.libvirtError as exc:
        raise ActionError(f"{what}: {exc.get_error_message()}") from None
    except TimeoutError:
        raise ActionError(f"{what}: no answer from libvirt within {STEP_TIMEOUT:g} s") from None
