"""``vmsched template``: VM templates, such as those a restore makes (OpenNebula's onetemplate)."""

from __future__ import annotations

import argparse

from lxml import etree

from scheduler.cli.context import FILTER_ALL, FILTER_MINE_AND_GROUPS, Context, Kind, add_id_command
from scheduler.cli.hosts import HOSTS
from scheduler.cli.offline import add_template_format
from scheduler.cli.tables import Column, field, format_time, join_sections, parse_xml, render_fields
from scheduler.model.objects.vmtemplate import DOMAIN_XML_KEY
from scheduler.model.template import from_element

TEMPLATES = Kind("VM template", "one.templatepool.info", "VMTEMPLATE_POOL", "VMTEMPLATE", (FILTER_ALL, -1, -1))

COLUMNS = (
    Column("ID", lambda t: field(t, "ID"), right=True),
    Column("USER", lambda t: field(t, "UNAME")),
    Column("GROUP", lambda t: field(t, "GNAME")),
    Column("NAME", lambda t: field(t, "NAME")),
    Column("REGTIME", lambda t: format_time(field(t, "REGTIME", "0"))),
)


def _domain(template: etree._Element) -> str:
    """``name (uuid)`` of the libvirt domain the template carries, ``-`` without one."""
    xml = field(template, f"TEMPLATE/{DOMAIN_XML_KEY}")
    if not xml:
        return "-"
    root = parse_xml(xml)
    return f"{root.findtext('name') or '?'} ({root.findtext('uuid') or '?'})"


def render_vm_template(template: etree._Element) -> str:
    body = template.find("TEMPLATE")
    shown = from_element(body) if body is not None else None
    if shown is not None:
        shown.remove(DOMAIN_XML_KEY)  # shown as LIBVIRT DOMAIN; --xml gives it whole
    return join_sections([
        render_fields(f"TEMPLATE {field(template, 'ID')} INFORMATION", [
            ("ID", field(template, "ID")),
            ("NAME", field(template, "NAME")),
            ("USER", field(template, "UNAME")),
            ("GROUP", field(template, "GNAME")),
            ("REGISTER TIME", format_time(field(template, "REGTIME", "0"))),
            ("LIBVIRT DOMAIN", _domain(template)),
        ]),
        "TEMPLATE CONTENTS\n" + (shown.render() if shown is not None else ""),
    ])  # fmt: skip


def create(ctx: Context, args: argparse.Namespace) -> int:
    ctx.print_id(ctx.call("one.template.allocate", ctx.read_template(args.file).render()))
    return 0


def list_templates(ctx: Context, args: argparse.Namespace) -> int:
    who = FILTER_ALL if args.all else FILTER_MINE_AND_GROUPS
    ctx.print_pool(TEMPLATES, ctx.call("one.templatepool.info", who, -1, -1), COLUMNS)
    return 0


def show(ctx: Context, args: argparse.Namespace) -> int:
    ctx.print_object(ctx.call("one.template.info", ctx.resolve(TEMPLATES, args.template), False, False),
                     render_vm_template)
    return 0


def delete(ctx: Context, args: argparse.Namespace) -> int:
    ctx.call("one.template.delete", ctx.resolve(TEMPLATES, args.template), False)
    return 0


def instantiate(ctx: Context, args: argparse.Namespace) -> int:
    template_id = ctx.resolve(TEMPLATES, args.template)
    host_id = ctx.resolve(HOSTS, args.host)
    ctx.print_id(ctx.call("vmsched.template.instantiate", template_id, host_id, args.start))
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser("template", help="VM templates (onetemplate) and template files", parents=[common])
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    add_template_format(sub, common)

    p = sub.add_parser("create", help="register a VM template from a template file", parents=[common])
    p.add_argument("file", metavar="FILE", help="template file, - for standard input")
    p.set_defaults(handler=create)

    p = sub.add_parser("list", help="list my templates and my groups' templates", parents=[common])
    p.add_argument("--all", action="store_true", help="every template I may see")
    p.set_defaults(handler=list_templates)

    add_id_command(sub, common, "show", "show a VM template", "template", show)
    add_id_command(sub, common, "delete", "delete a VM template (its images stay)", "template", delete)
    p = add_id_command(sub, common, "instantiate", "define the template's libvirt domain on a host and register "
                       "it as a VM", "template", instantiate)
    p.add_argument("--host", required=True, metavar="HOST", help="host id or name")
    p.add_argument("--start", action="store_true", help="start the domain once defined")
