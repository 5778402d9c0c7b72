"""one.datastore.* and one.datastorepool.info: image and backup datastores."""

from __future__ import annotations

from drivers.datastore import check_backup_template, check_ports, server_of
from scheduler.api.common import parse_request_template, update_template, xml_string
from scheduler.api.context import Context
from scheduler.api.firstcontact import FINGERPRINT_KEY, accept_server_key, take_acceptance
from scheduler.api.permissions import Caller, require_admin
from scheduler.api.registry import registry
from scheduler.api.rpc import Param
from scheduler.errors import ActionError, ValidationError
from scheduler.model.objects import pool_element
from scheduler.model.objects.common import Ownership, check_name
from scheduler.model.objects.datastore import Datastore
from scheduler.model.objects.states import DatastoreType, parse_code
from scheduler.model.template import Template

KIND = "datastore"


def check_datastore_template(template: Template, ds_type: DatastoreType) -> None:
    """The attributes a datastore of this type cannot work without, and sane values."""
    if ds_type is DatastoreType.BACKUP_DS:
        check_backup_template(template)
    elif not template.get("DS_MAD"):
        raise ValidationError("No DS_MAD in template.")
    check_ports(template)
    for key in ("BASE_PATH", "LIMIT_MB"):
        value = template.get(key)
        if key == "BASE_PATH" and value and not value.startswith("/"):
            raise ValidationError(f"BASE_PATH must be an absolute path, got {value!r}")
        if key == "LIMIT_MB" and value and not value.isdigit():
            raise ValidationError(f"LIMIT_MB must be a whole number of MB, got {value!r}")


async def first_contact(ctx: Context, datastore: Datastore) -> None:
    """``ACCEPT_HOSTKEY = "YES"``: record the key the backup server presents now (scheduler.api.firstcontact).
    The hypervisors get it from vmsched before each upload (scheduler.backup.run)."""
    if not take_acceptance(datastore.template):
        return
    target = server_of(datastore)
    if target is None:
        raise ValidationError(f"ACCEPT_HOSTKEY applies to rsync and restic datastores, whose backup server is "
                              f"reached over SSH; DS_MAD {datastore.ds_mad!r} has none")
    datastore.template.set(FINGERPRINT_KEY, await accept_server_key(ctx, f"datastore {datastore.name}", target))


@registry.method("one.datastore.allocate", Param("template", str), Param("cluster_id", int, -1))
async def allocate(ctx: Context, caller: Caller, text: str, cluster_id: int) -> int:
    require_admin(caller, "create datastores")
    template = parse_request_template(text, "datastore template")
    name = check_name(template.get("NAME") or "", "datastore")
    template.remove("NAME")
    ds_type = parse_code(DatastoreType, template.get("TYPE") or "IMAGE_DS")
    template.set("TYPE", ds_type.name)
    check_datastore_template(template, ds_type)
    datastore = Datastore(
        id=-1,
        name=name,
        type=ds_type,
        ds_mad=template.get("DS_MAD") or "",
        tm_mad=template.get("TM_MAD") or "-",
        ownership=Ownership(caller.user_id, caller.gid, caller.name, _group_name(caller.gid)),
        template=template,
    )
    await first_contact(ctx, datastore)  # the key exchange happens before anything is stored
    async with ctx.state.mutation() as m:
        taken = next((d for d in ctx.state.datastores.all() if d.name == name), None)
        if taken is not None:
            raise ValidationError(f"NAME is already taken by DATASTORE {taken.id}.")
        datastore.id = await m.new_id(KIND)
        m.put(KIND, datastore)
    return datastore.id


def _group_name(gid: int) -> str:
    return "oneadmin" if gid == 0 else "users"


@registry.method("one.datastore.info", Param("id", int), Param("decrypt", bool, False))
async def info(ctx: Context, caller: Caller, ds_id: int, decrypt: bool) -> str:
    return ctx.state.datastores.get(ds_id).to_xml(show_secrets=decrypt and caller.admin)


@registry.method("one.datastore.delete", Param("id", int))
async def delete(ctx: Context, caller: Caller, ds_id: int) -> int:
    require_admin(caller, "delete datastores")
    async with ctx.state.mutation() as m:
        datastore = ctx.state.datastores.get(ds_id)
        if datastore.images:
            raise ActionError(f"Cannot delete datastore [{ds_id}]: it holds images {', '.join(map(str, datastore.images))}.")
        m.delete(KIND, ds_id)
    return ds_id


@registry.method("one.datastore.update", Param("id", int), Param("template", str), Param("type", int, 0))
async def update(ctx: Context, caller: Caller, ds_id: int, text: str, merge: int) -> int:
    """``ACCEPT_HOSTKEY = "YES"`` in ``text`` records the backup server's key (first contact) before the
    change commits, outside the state lock."""
    require_admin(caller, "update datastores")
    wanted = ctx.state.datastores.editable(ds_id)
    wanted.template = _updated(wanted, text, merge)
    await first_contact(ctx, wanted)
    async with ctx.state.mutation() as m:
        datastore = ctx.state.datastores.editable(ds_id)
        datastore.template = _updated(datastore, text, merge)
        take_acceptance(datastore.template)
        if FINGERPRINT_KEY in wanted.template:
            datastore.template.set(FINGERPRINT_KEY, wanted.template.get(FINGERPRINT_KEY) or "")
        datastore.tm_mad = datastore.template.get("TM_MAD") or datastore.tm_mad
        m.put(KIND, datastore)
    return ds_id


def _updated(datastore: Datastore, text: str, merge: int) -> Template:
    template = update_template(datastore.template, text, merge, f"datastore {datastore.id} template")
    template.remove("NAME")
    for fixed in ("TYPE", "DS_MAD"):  # the kind of a datastore does not change under its images
        template.set(fixed, datastore.template.get(fixed) or (datastore.type.name if fixed == "TYPE" else datastore.ds_mad))
    check_datastore_template(template, datastore.type)
    return template


@registry.method("one.datastorepool.info")
async def pool_info(ctx: Context, caller: Caller) -> str:
    return xml_string(pool_element(KIND, ctx.state.datastores.all(), show_secrets=False))
