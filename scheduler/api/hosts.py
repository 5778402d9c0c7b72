"""one.host.* and one.hostpool.info: hypervisors vmsched reaches over SSH and libvirt."""

from __future__ import annotations

import logging

from scheduler.api.common import update_template, xml_string
from scheduler.api.context import Context
from scheduler.api.firstcontact import FINGERPRINT_KEY, accept_server_key, take_acceptance
from scheduler.api.permissions import Caller, require_admin
from scheduler.api.registry import registry
from scheduler.api.rpc import Param
from scheduler.errors import ActionError, ValidationError
from scheduler.hosts.links import is_local, ssh_target
from scheduler.model.objects import pool_element
from scheduler.model.objects.common import check_name
from scheduler.model.objects.host import Host
from scheduler.model.objects.states import HostState
from scheduler.model.template import Template

log = logging.getLogger(__name__)

KIND = "host"
_STATUS = {0: None, 1: HostState.DISABLED, 2: HostState.OFFLINE}


def check_host_template(template: Template) -> None:
    """The reach-a-host extensions must make sense before anything uses them."""
    port = template.get("SSH_PORT")
    if port is not None and port != "" and not (port.isdigit() and 0 < int(port) < 65536):
        raise ValidationError(f"SSH_PORT must be a TCP port (1-65535), got {port!r}")
    for key in ("SSH_HOST", "SSH_USER", "SSH_KEY", "LIBVIRT_URI"):
        value = template.get(key)
        if value is not None and any(ch in value for ch in "\n\r\0"):
            raise ValidationError(f"{key} must be a single line")


@registry.method("one.host.allocate", Param("name", str), Param("im_mad", str, "kvm"), Param("vm_mad", str, "kvm"),
                 Param("cluster_id", int, -1))
async def allocate(ctx: Context, caller: Caller, name: str, im_mad: str, vm_mad: str, cluster_id: int) -> int:
    require_admin(caller, "create hosts")
    name = check_name(name, "host")
    async with ctx.state.mutation() as m:
        if any(h.name == name for h in ctx.state.hosts.all()):
            raise ValidationError(f"NAME is already taken by HOST {_named(ctx, name).id}.")
        host = Host(id=await m.new_id(KIND), name=name, im_mad=im_mad or "kvm", vm_mad=vm_mad or "kvm")
        m.put(KIND, host)
    return host.id


def _named(ctx: Context, name: str) -> Host:
    return next(h for h in ctx.state.hosts.all() if h.name == name)


@registry.method("one.host.info", Param("id", int), Param("decrypt", bool, False))
async def info(ctx: Context, caller: Caller, host_id: int, decrypt: bool) -> str:
    require_admin(caller, "see hosts")
    return ctx.state.hosts.get(host_id).to_xml()


@registry.method("one.host.delete", Param("id", int))
async def delete(ctx: Context, caller: Caller, host_id: int) -> int:
    require_admin(caller, "delete hosts")
    async with ctx.state.mutation() as m:
        host = ctx.state.hosts.get(host_id)
        if host.vms:
            raise ActionError(f"Cannot delete host [{host_id}]: it has VMs {', '.join(map(str, host.vms))}.")
        m.delete(KIND, host_id)
    return host_id


@registry.method("one.host.update", Param("id", int), Param("template", str), Param("type", int, 0))
async def update(ctx: Context, caller: Caller, host_id: int, text: str, merge: int) -> int:
    """``ACCEPT_HOSTKEY = "YES"`` in ``text`` is first contact: the key the host presents now is recorded in
    vmsched's known_hosts and its fingerprint in ``SSH_HOSTKEY_FINGERPRINT``; the attribute itself is never
    stored. The key exchange happens before the change commits, outside the state lock."""
    require_admin(caller, "update hosts")
    host = ctx.state.hosts.get(host_id)
    wanted = _updated(host.template, text, merge, host_id)
    fingerprint = await first_contact(ctx, host.name, wanted) if take_acceptance(wanted) else ""
    async with ctx.state.mutation() as m:
        host = ctx.state.hosts.editable(host_id)
        host.template = _updated(host.template, text, merge, host_id)
        take_acceptance(host.template)
        if fingerprint:
            host.template.set(FINGERPRINT_KEY, fingerprint)
        m.put(KIND, host)
    return host_id


def _updated(template: Template, text: str, merge: int, host_id: int) -> Template:
    updated = update_template(template, text, merge, f"host {host_id} template")
    check_host_template(updated)
    return updated


async def first_contact(ctx: Context, name: str, template: Template) -> str:
    """The key the host presents, recorded (see scheduler.api.firstcontact); the scheduler's own machine
    needs none."""
    if is_local(template):
        return ""
    return await accept_server_key(ctx, f"host {name}", ssh_target(name, template))


@registry.method("one.host.status", Param("id", int), Param("status", int))
async def status(ctx: Context, caller: Caller, host_id: int, wanted: int) -> int:
    require_admin(caller, "change host status")
    if wanted not in _STATUS:
        raise ValidationError(f"host status must be 0 (enabled), 1 (disabled) or 2 (offline), got {wanted}")
    async with ctx.state.mutation() as m:
        host = ctx.state.hosts.editable(host_id)
        new_state = _STATUS[wanted]
        if new_state is None:
            new_state = HostState.INIT if host.state in (HostState.DISABLED, HostState.OFFLINE) else host.state
        host.prev_state, host.state = host.state, new_state
        m.put(KIND, host)
    return host_id


@registry.method("one.hostpool.info")
async def pool_info(ctx: Context, caller: Caller) -> str:
    require_admin(caller, "see hosts")
    return xml_string(pool_element(KIND, ctx.state.hosts.all()))
