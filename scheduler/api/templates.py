"""one.template.* and one.templatepool.info: VM templates; vmsched.template.instantiate.

Templates are owned objects: anybody may create one, its owner (and administrators) may read it (USE)
and delete it (MANAGE). NAME is required and unique among one owner's templates; it becomes the
object's NAME and leaves the TEMPLATE, as in OpenNebula. A template made by a restore carries the
restored domain's libvirt XML in ``VMSCHED_DOMAIN_XML`` (scheduler.model.objects.vmtemplate).

``vmsched.template.instantiate(session, template_id: int, host_id: int, start: bool = False)`` (admin
only, as it places a domain on a host) defines that domain on the host, starts it with ``start``, and
registers it as a VM exactly as ``one.host.importvm`` does; the VM then gets what the template says
beyond the domain: BACKUP_CONFIG (OpenNebula's parsing), SCHED_ACTIONs (as new actions), OS keys
other than UUID, and every other attribute (CONTEXT, GRAPHICS, LABELS...) in TEMPLATE or
USER_TEMPLATE as a new VM's template would place them. CPU, VCPU, MEMORY, DISK and NIC come from the
domain itself. Everything is checked before the host is touched; a template whose domain (UUID) is a
VM already is refused (its disks belong to that VM); if starting fails the definition is removed again.
Returns the VM id.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from drivers.vmm import KvmHost
from scheduler.api.common import pool_slice, xml_string
from scheduler.api.context import Context
from scheduler.api.imports import read_host_domain, store_domain, vm_of_domain
from scheduler.api.permissions import Caller, Right, require, require_admin
from scheduler.api.registry import registry
from scheduler.api.rpc import Param
from scheduler.api.schedactions import parse_actions, store_actions
from scheduler.errors import ActionError, DriverError, ValidationError
from scheduler.hosts import vmtemplates
from scheduler.hosts.vmimport import IMPORTED_NAMES, read_domain
from scheduler.model import backup_config as backups
from scheduler.model.objects import pool_element
from scheduler.model.objects.host import Host
from scheduler.model.objects.vm import Vm, split_vm_template
from scheduler.model.objects.vmtemplate import DOMAIN_XML_KEY, VmTemplate
from scheduler.model.schedule import SchedAction
from scheduler.model.template import Template, Value, Vector
from scheduler.store.state import State

KIND = "template"
log = logging.getLogger(__name__)
_INSTANTIATING: set[str] = set()  # domain UUIDs being defined: one instantiate per domain at a time


@registry.method("one.template.allocate", Param("template", str))
async def allocate(ctx: Context, caller: Caller, text: str) -> int:
    name, template = vmtemplates.checked_request(text)
    async with ctx.state.mutation() as m:
        return await vmtemplates.add(ctx.state, m, caller.ownership, name, template, ctx.now())


@registry.method("one.template.info", Param("id", int), Param("extended", bool, False), Param("decrypt", bool, False))
async def info(ctx: Context, caller: Caller, template_id: int, extended: bool, decrypt: bool) -> str:
    vm_template = ctx.state.templates.get(template_id)
    require(caller, vm_template.ownership.uid, Right.USE, "TEMPLATE", template_id, "info")
    return vm_template.to_xml()


@registry.method("one.template.delete", Param("id", int), Param("recursive", bool, False))
async def delete(ctx: Context, caller: Caller, template_id: int, recursive: bool) -> int:
    """Only the template; with ``recursive`` OpenNebula also deletes its images, which vmsched refuses."""
    if recursive:
        raise ActionError("recursive delete (the template's images too) is not supported: delete the template, "
                          "then each image with one.image.delete")
    async with ctx.state.mutation() as m:
        vm_template = ctx.state.templates.get(template_id)
        require(caller, vm_template.ownership.uid, Right.MANAGE, "TEMPLATE", template_id, "delete")
        m.delete(KIND, template_id)
    return template_id


@registry.method("one.templatepool.info", Param("filter", int, -2), Param("start", int, -1), Param("end", int, -1))
async def pool_info(ctx: Context, caller: Caller, pool_filter: int, start: int, end: int) -> str:
    return xml_string(pool_element(KIND, pool_slice(caller, ctx.state.templates.all(), pool_filter, start, end)))


# ---- instantiate ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VmSettings:
    """What a VM instantiated from a template gets beyond its domain."""

    backup_config: Vector | None
    sched_actions: list[Value]
    os_keys: Vector
    template: Template
    user_template: Template


def settings_of(template: Template) -> VmSettings:
    rest = template.copy()
    for name in ("NAME", DOMAIN_XML_KEY, *IMPORTED_NAMES):
        rest.remove(name)
    configs = rest.remove("BACKUP_CONFIG")
    if len(configs) > 1 or (configs and not isinstance(configs[0], Vector)):
        raise ValidationError("BACKUP_CONFIG must be one vector attribute: BACKUP_CONFIG = [ KEEP_LAST = ..., ... ]")
    os_keys = Vector((key, value) for os_vector in rest.remove("OS") if isinstance(os_vector, Vector)
                     for key, value in os_vector.items() if key != "UUID")
    actions = rest.remove("SCHED_ACTION")
    kept, user = split_vm_template(rest)
    config = configs[0] if configs else None
    return VmSettings(config if isinstance(config, Vector) else None, actions, os_keys, kept, user)


def apply_settings(state: State, vm: Vm, settings: VmSettings, origin: int) -> list[SchedAction]:
    """Give ``vm`` (an editable copy) the template's settings; the parsed scheduled actions to store."""
    if settings.backup_config is not None:
        volatile = (settings.backup_config.get("BACKUP_VOLATILE") or "NO").upper() == "YES"
        vm.backup_config = backups.parse_backup_config(
            vm.backup_config, settings.backup_config,
            can_increment=backups.can_increment(vm.template.vectors("DISK"), False, volatile), append=False)
    os_vector = vm.template.get_vector("OS")
    if os_vector is not None:
        for key, text in settings.os_keys.items():
            os_vector.setdefault(key, text)
    for name in settings.template.names():
        vm.template.remove(name)
        for value in settings.template.values(name):
            vm.template.add(name, value.copy() if isinstance(value, Vector) else value)
    vm.user_template.merge(settings.user_template.copy())
    return parse_actions(state, vm, settings.sched_actions, origin=origin)


def _checked_settings(ctx: Context, vm_template: VmTemplate) -> VmSettings:
    """The template's settings, tried on a stand-in VM so that nothing on the host happens for nothing."""
    settings = settings_of(vm_template.template)
    apply_settings(ctx.state, Vm(id=-1, name=vm_template.name, backup_config=backups.default_backup_config()),
                   settings, ctx.now())
    return settings


async def _forget_domain(kvm: KvmHost, uuid: str, started: bool) -> None:
    """Best effort after a failed instantiate: stop and undefine what was just defined."""
    try:
        if started:
            await kvm.destroy(uuid)
        await kvm.undefine(uuid)
    except DriverError as exc:
        log.warning("domain %s: left on the host after a failed instantiate: %s", uuid, exc)


@registry.method("vmsched.template.instantiate", Param("id", int), Param("host_id", int), Param("start", bool, False))
async def instantiate(ctx: Context, caller: Caller, template_id: int, host_id: int, start: bool) -> int:
    require_admin(caller, "define domains on hosts")
    vm_template = ctx.state.templates.get(template_id)
    host = ctx.state.hosts.get(host_id)
    ctx.connections("templates cannot be instantiated")
    xml = vm_template.domain_xml
    if xml is None:
        raise ActionError(f"VM template {template_id} has no libvirt domain ({DOMAIN_XML_KEY}); "
                          "only templates made by a restore can be instantiated")
    facts = read_domain(xml)
    existing = vm_of_domain(ctx, facts.uuid)
    if existing is not None:
        raise ActionError(f"VM template {template_id} was instantiated already: its domain {facts.uuid} is VM "
                          f"{existing.id}, which owns its disks")
    settings = _checked_settings(ctx, vm_template)
    if facts.uuid in _INSTANTIATING:
        raise ActionError(f"VM template {template_id} is being instantiated already (domain {facts.uuid})")
    _INSTANTIATING.add(facts.uuid)
    try:
        return await _instantiate(ctx, caller, vm_template, host, settings, start)
    finally:
        _INSTANTIATING.discard(facts.uuid)


async def _instantiate(ctx: Context, caller: Caller, vm_template: VmTemplate, host: Host, settings: VmSettings,
                       start: bool) -> int:
    xml = vm_template.domain_xml or ""
    links = ctx.connections("templates cannot be instantiated")
    kvm = links.vmm(host)
    defined = await kvm.define(xml)
    started = False
    try:
        if start:
            await kvm.start(defined.uuid)
            started = True
        seen = await read_host_domain(kvm, links.runner(host), host, defined.uuid)
    except DriverError:
        await _forget_domain(kvm, defined.uuid, started)
        raise
    vm_id, _ = await store_domain(ctx, caller, host, seen)
    async with ctx.state.mutation() as m:
        vm = ctx.state.vms.editable(vm_id)
        actions = apply_settings(ctx.state, vm, settings, ctx.now())
        m.put("vm", vm)  # before its actions: their rows take the VM's owner
        await store_actions(m, vm, actions)
    log.info("VM template %s instantiated on host %s as VM %s (domain %s, %s)", vm_template.id, host.name, vm_id,
             defined.name, "started" if start else "not started")
    return vm_id
