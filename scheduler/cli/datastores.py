"""``vmsched datastore``: where backups go (OpenNebula's onedatastore)."""

from __future__ import annotations

import argparse

from lxml import etree

from scheduler.cli.context import UPDATE_MERGE, Context, Kind, add_id_command, add_update_command, update_type
from scheduler.cli.states import (
    DATASTORE_STATE_SHORT,
    DATASTORE_STATES,
    DATASTORE_TYPE_SHORT,
    DATASTORE_TYPES,
    name_of,
)
from scheduler.cli.tables import Column, field, format_mb, ids, join_sections, render_fields, render_template

DATASTORES = Kind("datastore", "one.datastorepool.info", "DATASTORE_POOL", "DATASTORE")


def _available(ds: etree._Element) -> str:
    try:
        total, free = int(field(ds, "TOTAL_MB", "0")), int(field(ds, "FREE_MB", "0"))
    except ValueError:
        return "-"
    return f"{free * 100 // total}%" if total > 0 else "-"


COLUMNS = (
    Column("ID", lambda d: field(d, "ID"), right=True),
    Column("NAME", lambda d: field(d, "NAME")),
    Column("SIZE", lambda d: format_mb(field(d, "TOTAL_MB", "0")), right=True),
    Column("AVA", _available, right=True),
    Column("IMAGES", lambda d: str(len(ids(d, "IMAGES"))), right=True),
    Column("TYPE", lambda d: name_of(DATASTORE_TYPE_SHORT, field(d, "TYPE"))),
    Column("DS", lambda d: field(d, "DS_MAD", "-")),
    Column("STAT", lambda d: name_of(DATASTORE_STATE_SHORT, field(d, "STATE"))),
)


def render_datastore(ds: etree._Element) -> str:
    images = ids(ds, "IMAGES")
    return join_sections([
        render_fields(f"DATASTORE {field(ds, 'ID')} INFORMATION", [
            ("ID", field(ds, "ID")),
            ("NAME", field(ds, "NAME")),
            ("USER", field(ds, "UNAME")),
            ("GROUP", field(ds, "GNAME")),
            ("TYPE", name_of(DATASTORE_TYPES, field(ds, "TYPE"))),
            ("DS_MAD", field(ds, "DS_MAD", "-")),
            ("TM_MAD", field(ds, "TM_MAD", "-")),
            ("BASE PATH", field(ds, "BASE_PATH", "-")),
            ("STATE", name_of(DATASTORE_STATES, field(ds, "STATE"))),
        ]),
        render_fields("DATASTORE CAPACITY", [
            ("TOTAL", format_mb(field(ds, "TOTAL_MB", "0"))),
            ("FREE", format_mb(field(ds, "FREE_MB", "0"))),
            ("USED", format_mb(field(ds, "USED_MB", "0"))),
        ]),
        render_template("DATASTORE TEMPLATE", ds.find("TEMPLATE")),
        f"IMAGES\nIDS: {','.join(images) if images else '-'}\n",
    ])  # fmt: skip


def create(ctx: Context, args: argparse.Namespace) -> int:
    template = ctx.read_template(args.file)
    if args.accept_hostkey:
        template.set("ACCEPT_HOSTKEY", "YES")
    ds_id = ctx.call("one.datastore.allocate", template.render(), -1)
    if args.accept_hostkey:
        ctx.tell_fingerprint("datastore", "one.datastore.info", ds_id)
    ctx.print_id(ds_id)
    return 0


def accept_hostkey(ctx: Context, args: argparse.Namespace) -> int:
    ds_id = ctx.resolve(DATASTORES, args.datastore)
    ctx.call("one.datastore.update", ds_id, 'ACCEPT_HOSTKEY = "YES"', UPDATE_MERGE)
    ctx.tell_fingerprint("datastore", "one.datastore.info", ds_id)
    return 0


def list_datastores(ctx: Context, args: argparse.Namespace) -> int:
    ctx.print_pool(DATASTORES, ctx.call("one.datastorepool.info"), COLUMNS)
    return 0


def show(ctx: Context, args: argparse.Namespace) -> int:
    ds_id = ctx.resolve(DATASTORES, args.datastore)
    ctx.print_object(ctx.call("one.datastore.info", ds_id, False), render_datastore)
    return 0


def update(ctx: Context, args: argparse.Namespace) -> int:
    template = ctx.read_template(args.file)
    ds_id = ctx.resolve(DATASTORES, args.datastore)
    ctx.call("one.datastore.update", ds_id, template.render(), update_type(args.append))
    return 0


def delete(ctx: Context, args: argparse.Namespace) -> int:
    ctx.call("one.datastore.delete", ctx.resolve(DATASTORES, args.datastore))
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser("datastore", help="backup datastores (onedatastore)", parents=[common])
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    p = sub.add_parser("create", help="register a datastore from a template file", parents=[common])
    p.add_argument("file", metavar="FILE", help="template file, - for standard input")
    p.add_argument("--accept-hostkey", action="store_true",
                   help="trust the key the backup server (rsync, restic) presents on first contact")
    p.set_defaults(handler=create)

    sub.add_parser("list", help="list datastores", parents=[common]).set_defaults(handler=list_datastores)
    add_id_command(sub, common, "show", "show a datastore", "datastore", show)
    add_update_command(sub, common, "update", "replace (or --append to) the datastore template", "datastore", update)
    add_id_command(sub, common, "delete", "unregister a datastore", "datastore", delete)
    add_id_command(sub, common, "accept-hostkey", "trust the key the backup server presents now (never replaces "
                   "another recorded key)", "datastore", accept_hostkey)
