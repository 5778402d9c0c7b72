"""``vmsched image``: backup images (OpenNebula's oneimage)."""

from __future__ import annotations

import argparse

from lxml import etree

from scheduler.cli.context import Context, Kind, add_id_command
from scheduler.cli.states import IMAGE_STATE_SHORT, IMAGE_STATES, IMAGE_TYPE_SHORT, IMAGE_TYPES, name_of
from scheduler.cli.tables import (
    Column,
    field,
    format_mb,
    format_time,
    ids,
    join_sections,
    render_fields,
    render_table,
    render_template,
)

FILTER_ALL, FILTER_MINE_AND_GROUPS = -2, -1
IMAGES = Kind("image", "one.imagepool.info", "IMAGE_POOL", "IMAGE", (FILTER_ALL, -1, -1))

COLUMNS = (
    Column("ID", lambda i: field(i, "ID"), right=True),
    Column("USER", lambda i: field(i, "UNAME")),
    Column("GROUP", lambda i: field(i, "GNAME")),
    Column("NAME", lambda i: field(i, "NAME")),
    Column("DATASTORE", lambda i: field(i, "DATASTORE")),
    Column("SIZE", lambda i: format_mb(field(i, "SIZE", "0")), right=True),
    Column("TYPE", lambda i: name_of(IMAGE_TYPE_SHORT, field(i, "TYPE"))),
    Column("STAT", lambda i: name_of(IMAGE_STATE_SHORT, field(i, "STATE"))),
)

INCREMENT_COLUMNS = (
    Column("ID", lambda i: field(i, "ID"), right=True),
    Column("PARENT", lambda i: field(i, "PARENT_ID", "-"), right=True),
    Column("TYPE", lambda i: field(i, "TYPE")),
    Column("SIZE", lambda i: format_mb(field(i, "SIZE", "0")), right=True),
    Column("DATE", lambda i: format_time(field(i, "DATE", "0"))),
    Column("SOURCE", lambda i: field(i, "SOURCE")),
)


def render_image(image: etree._Element) -> str:
    increments = image.findall("BACKUP_INCREMENTS/INCREMENT")
    vms = ids(image, "VMS")
    return join_sections([
        render_fields(f"IMAGE {field(image, 'ID')} INFORMATION", [
            ("ID", field(image, "ID")),
            ("NAME", field(image, "NAME")),
            ("USER", field(image, "UNAME")),
            ("GROUP", field(image, "GNAME")),
            ("DATASTORE", field(image, "DATASTORE")),
            ("TYPE", name_of(IMAGE_TYPES, field(image, "TYPE"))),
            ("REGISTER TIME", format_time(field(image, "REGTIME", "0"))),
            ("SOURCE", field(image, "SOURCE", "-")),
            ("FORMAT", field(image, "FORMAT", "-")),
            ("SIZE", format_mb(field(image, "SIZE", "0"))),
            ("STATE", name_of(IMAGE_STATES, field(image, "STATE"))),
            ("VMS", ",".join(vms) if vms else "-"),
        ]),
        "BACKUP INCREMENTS\n" + render_table(INCREMENT_COLUMNS, increments) if increments else "",
        render_template("IMAGE TEMPLATE", image.find("TEMPLATE")),
    ])  # fmt: skip


def list_images(ctx: Context, args: argparse.Namespace) -> int:
    who = FILTER_ALL if args.all else FILTER_MINE_AND_GROUPS
    ctx.print_pool(IMAGES, ctx.call("one.imagepool.info", who, -1, -1), COLUMNS)
    return 0


def show(ctx: Context, args: argparse.Namespace) -> int:
    ctx.print_object(ctx.call("one.image.info", ctx.resolve(IMAGES, args.image), False), render_image)
    return 0


def delete(ctx: Context, args: argparse.Namespace) -> int:
    ctx.call("one.image.delete", ctx.resolve(IMAGES, args.image), args.force)
    return 0


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser("image", help="backup images (oneimage)", parents=[common])
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    p = sub.add_parser("list", help="list my images and my groups' images", parents=[common])
    p.add_argument("--all", action="store_true", help="every image I may see")
    p.set_defaults(handler=list_images)

    add_id_command(sub, common, "show", "show an image", "image", show)
    p = add_id_command(sub, common, "delete", "delete an image and its backup data", "image", delete)
    p.add_argument("--force", action="store_true", help="delete even if the datastore cannot remove the data")
