"""one.host.importvm (a vmsched extension): register a host's libvirt domains as VMs.

``one.host.importvm(session, host_id: int, domains: array of strings = [], all: bool = False)``
imports the named domains (names or UUIDs) of the host, or every domain with ``all``. The answer is an
array with one struct per domain: ``{"DOMAIN": name, "UUID": uuid, "ID": vm id (-1 when it failed),
"STATUS": "created" | "updated" | "failed", "MESSAGE": text}``; a domain that cannot be imported is
reported there and the others are imported anyway. Admin only.

A domain whose UUID is already a VM's refreshes that VM (template, DEPLOY_ID, STATE, host) and keeps
its id, NAME, BACKUP_CONFIG, BACKUP_IDS, scheduled actions and USER_TEMPLATE. What a domain becomes is
``scheduler.hosts.vmimport``; disk sizes come from ``qemu-img info`` on the host (file and block disks) or
libvirt's block info (RBD disks).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from drivers.vmm import DomainState, KvmHost
from drivers.vmm.domainxml import Disk
from drivers.vmm.imageinfo import image_info
from scheduler.api.context import Context
from scheduler.api.permissions import Caller, require_admin
from scheduler.api.registry import registry
from scheduler.api.rpc import Param
from scheduler.errors import DriverError, ValidationError, VmschedError
from scheduler.hosts.placement import bind
from scheduler.hosts.vmimport import DomainFacts, import_template, read_domain, size_mb, unique_name, vm_states
from scheduler.model import backup_config as backups
from scheduler.model.objects.host import Host
from scheduler.model.objects.vm import Vm, set_states

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Seen:
    """One domain as read from its host, before anything is written."""

    facts: DomainFacts
    state: DomainState
    sizes: dict[str, int | None]


async def _disk_size(kvm: KvmHost, runner: Any, host: Host, uuid: str, disk: Disk) -> int | None:
    """The disk's virtual size in MB, None when it cannot be known (logged)."""
    try:
        if disk.path and disk.type in ("file", "block"):
            return size_mb((await image_info(runner, disk.path, host.name)).virtual_size)
        if disk.type == "network" and disk.image:
            # KvmHost has no public block-info call yet; its host thread is the way to libvirt.
            capacity = await kvm.block_capacity(uuid, disk.target)
            return size_mb(int(capacity))
    except DriverError as exc:
        log.warning("host %s: domain %s: size of disk %s unknown: %s", host.name, uuid, disk.target, exc)
    return None


async def read_host_domain(kvm: KvmHost, runner: Any, host: Host, ref: str) -> Seen:
    facts = read_domain(await kvm.xml(ref))
    state = await kvm.state(facts.uuid)
    sizes = {disk.target: await _disk_size(kvm, runner, host, facts.uuid, disk)
             for disk in facts.disks if disk.has_source}
    return Seen(facts, state, sizes)


def vm_of_domain(ctx: Context, uuid: str) -> Vm | None:
    return next((vm for vm in ctx.state.vms.all() if (vm.uuid or "").lower() == uuid), None)


async def store_domain(ctx: Context, caller: Caller, host: Host, seen: Seen) -> tuple[int, bool]:
    """Create or refresh the VM of one domain; (VM id, whether it was created)."""
    now = ctx.now()
    async with ctx.state.mutation() as m:
        existing = vm_of_domain(ctx, seen.facts.uuid)
        if existing is None:
            vm = Vm(
                id=await m.new_id("vm"),
                name=unique_name(seen.facts.name, (other.name for other in ctx.state.vms.all())),
                ownership=caller.ownership,
                stime=now,
                backup_config=backups.default_backup_config(),
            )
        else:
            vm = ctx.state.vms.editable(existing.id)
        vm.template = import_template(seen.facts, seen.sizes, vm.template if existing else None)
        vm.deploy_id = seen.facts.name
        set_states(vm, *vm_states(seen.state))
        bind(m, vm, ctx.state.hosts.get(host.id), now)
        m.put("vm", vm)
    return vm.id, existing is None


def _result(name: str, uuid: str, vm_id: int, status: str, message: str = "") -> dict[str, Any]:
    return {"DOMAIN": name, "UUID": uuid, "ID": vm_id, "STATUS": status, "MESSAGE": message}


async def import_one(ctx: Context, caller: Caller, host: Host, ref: str) -> dict[str, Any]:
    links = ctx.connections("domains cannot be imported")
    kvm, runner = links.vmm(host), links.runner(host)
    try:
        seen = await read_host_domain(kvm, runner, host, ref)
        vm_id, created = await store_domain(ctx, caller, host, seen)
    except VmschedError as exc:
        log.warning("host %s: domain %s not imported: %s", host.name, ref, exc)
        return _result(ref, "", -1, "failed", str(exc))
    status = "created" if created else "updated"
    log.info("host %s: domain %s (%s) imported as VM %s (%s)", host.name, seen.facts.name, seen.facts.uuid,
             vm_id, status)
    return _result(seen.facts.name, seen.facts.uuid, vm_id, status)


@registry.method("one.host.importvm", Param("id", int), Param("domains", list, []), Param("all", bool, False))
async def importvm(ctx: Context, caller: Caller, host_id: int, names: list[str], every: bool) -> list[dict[str, Any]]:
    require_admin(caller, "import VMs")
    if any(not isinstance(name, str) or not name.strip() for name in names):
        raise ValidationError("domains must be an array of domain names or UUIDs")
    if bool(names) == every:
        raise ValidationError("name the domains to import, or ask for all of them (not both)")
    links = ctx.connections("domains cannot be imported")
    host = ctx.state.hosts.get(host_id)
    refs = [info.uuid for info in await links.vmm(host).list_domains()] if every else [n.strip() for n in names]
    return [await import_one(ctx, caller, host, ref) for ref in refs]
