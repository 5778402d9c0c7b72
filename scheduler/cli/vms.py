"""``vmsched vm``: the VMs vmsched backs up (OpenNebula's onevm)."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from lxml import etree

from scheduler.cli import backup
from scheduler.cli.client import UsageError
from scheduler.cli.context import (
    FILTER_ALL,
    FILTER_MINE_AND_GROUPS,
    Context,
    add_id_command,
    add_update_command,
    update_type,
)
from scheduler.cli.hosts import HOSTS
from scheduler.cli.images import IMAGES
from scheduler.cli.progress import Progress, show_fields
from scheduler.cli.states import LCM_STATES, VM_STATES, name_of, vm_stat
from scheduler.cli.tables import (
    Column,
    field,
    format_time,
    ids,
    join_sections,
    last_host,
    number_of,
    parse_xml,
    pretty_xml,
    render_fields,
    render_table,
    render_template,
    time_until,
)
from scheduler.cli.vmpool import (
    ANY_BUT_DONE,
    BACKUP_LCM_STATES,
    VMS,
    backup_progress,
)
from scheduler.engine.clock import SystemClock

RECOVER_DELETE = 3
_REPEAT = {"0": "Weekly", "1": "Monthly", "2": "Yearly", "3": "Hourly", "4": "Cron"}

COLUMNS = (
    Column("ID", lambda vm: field(vm, "ID"), right=True),
    Column("USER", lambda vm: field(vm, "UNAME")),
    Column("GROUP", lambda vm: field(vm, "GNAME")),
    Column("NAME", lambda vm: field(vm, "NAME")),
    Column("STAT", lambda vm: vm_stat(field(vm, "STATE"), field(vm, "LCM_STATE"))),
    Column("HOST", last_host),
)


def _repeat(action: etree._Element) -> str:
    kind = _REPEAT.get(field(action, "REPEAT", "-1"))
    return f"{kind} {field(action, 'DAYS')}".strip() if kind else "-"


def _end(action: etree._Element) -> str:
    end_type, value = field(action, "END_TYPE", "0"), field(action, "END_VALUE")
    if end_type == "1":
        return f"after {value} times"
    return format_time(value) if end_type == "2" else "none"


def _status(action: etree._Element, now: int) -> str:
    """onevm show's STATUS: the last error, else done (finished), else when it runs next."""
    if field(action, "MESSAGE"):
        return f"Error! {field(action, 'MESSAGE')}"
    time, done = number_of(action, "TIME"), number_of(action, "DONE") or -1
    if done > 0 and (time is None or time <= done):
        return f"Done on {format_time(str(done))}"
    if time is None:
        return "-"
    return f"Next in {time_until(time - now)}" if time > now else "Overdue!"


def _id(action: etree._Element, now: int) -> str:
    """The id, marked ``*`` once the WARNING time has passed on a pending action."""
    warning, time, done = number_of(action, "WARNING"), number_of(action, "TIME"), number_of(action, "DONE")
    warned = warning is not None and 0 < warning <= now and time is not None and time > (done or -1)
    return f"*{field(action, 'ID')}" if warned else field(action, "ID")


def _time(value: str) -> str:
    return format_time(value) if value.isdigit() else value or "-"


def sched_columns(now: int) -> tuple[Column, ...]:
    return (
        Column("ID", lambda a: _id(a, now), right=True),
        Column("ACTION", lambda a: field(a, "ACTION")),
        Column("ARGS", lambda a: field(a, "ARGS", "-")),
        Column("SCHEDULED", lambda a: _time(field(a, "TIME"))),
        Column("REPEAT", _repeat),
        Column("END", _end),
        Column("STATUS", lambda a: _status(a, now)),
    )


def render_vm(vm: etree._Element, now: int, progress: Progress | None = None) -> str:
    """``vm show``; ``now`` (epoch) is when the scheduled actions' STATUS is told; ``progress`` that of
    the backup running now."""
    actions = vm.findall("TEMPLATE/SCHED_ACTION")
    backups = ids(vm, "BACKUPS/BACKUP_IDS")
    return join_sections([
        render_fields(f"VIRTUAL MACHINE {field(vm, 'ID')} INFORMATION", [
            ("ID", field(vm, "ID")),
            ("NAME", field(vm, "NAME")),
            ("USER", field(vm, "UNAME")),
            ("GROUP", field(vm, "GNAME")),
            ("STATE", name_of(VM_STATES, field(vm, "STATE"))),
            ("LCM_STATE", name_of(LCM_STATES, field(vm, "LCM_STATE"))),
            ("HOST", last_host(vm)),
            ("START TIME", format_time(field(vm, "STIME", "0"))),
            ("DEPLOY ID", field(vm, "DEPLOY_ID", "-")),
        ]),
        render_fields("BACKUP PROGRESS", show_fields(progress)) if progress is not None else "",
        "SCHEDULED ACTIONS\n" + render_table(sched_columns(now), actions) if actions else "",
        render_template("BACKUP CONFIGURATION", vm.find("BACKUPS/BACKUP_CONFIG")),
        f"VM BACKUPS\nIMAGE IDS: {','.join(backups) if backups else '-'}\n",
        render_template("USER TEMPLATE", vm.find("USER_TEMPLATE")),
        render_template("VIRTUAL MACHINE TEMPLATE", vm.find("TEMPLATE")),
    ])  # fmt: skip


# -- handlers --------------------------------------------------------------------------------------


def create(ctx: Context, args: argparse.Namespace) -> int:
    template = ctx.read_template(args.file)
    ctx.print_id(ctx.call("one.vm.allocate", template.render(), args.hold))
    return 0


def list_vms(ctx: Context, args: argparse.Namespace) -> int:
    who = FILTER_ALL if args.all else FILTER_MINE_AND_GROUPS
    ctx.print_pool(VMS, ctx.call("one.vmpool.info", who, -1, -1, ANY_BUT_DONE), COLUMNS)
    return 0


def show(ctx: Context, args: argparse.Namespace) -> int:
    """``vm show VM``; a VM being backed up also shows the progress of its backup (table output)."""
    now = int(SystemClock().now())
    vm_id = ctx.resolve(VMS, args.vm)
    text = ctx.call("one.vm.info", vm_id, False)
    progress = None
    if ctx.output == "table" and name_of(LCM_STATES, field(parse_xml(str(text)), "LCM_STATE")) in BACKUP_LCM_STATES:
        progress = backup_progress(ctx, vm_id)
    ctx.print_object(text, lambda vm: render_vm(vm, now, progress))
    return 0


def update(ctx: Context, args: argparse.Namespace) -> int:
    template = ctx.read_template(args.file)
    ctx.call("one.vm.update", ctx.resolve(VMS, args.vm), template.render(), update_type(args.append))
    return 0


def updateconf(ctx: Context, args: argparse.Namespace) -> int:
    template = ctx.read_template(args.file)
    ctx.call("one.vm.updateconf", ctx.resolve(VMS, args.vm), template.render(), update_type(args.append))
    return 0


def rename(ctx: Context, args: argparse.Namespace) -> int:
    ctx.call("one.vm.rename", ctx.resolve(VMS, args.vm), args.name)
    return 0


def deploy(ctx: Context, args: argparse.Namespace) -> int:
    ctx.call("one.vm.deploy", ctx.resolve(VMS, args.vm), ctx.resolve(HOSTS, args.host), False, -1)
    return 0


def delete(ctx: Context, args: argparse.Namespace) -> int:
    ctx.call("one.vm.recover", ctx.resolve(VMS, args.vm), RECOVER_DELETE)
    return 0


# -- vm backup: now, or as a scheduled action (--schedule) -----------------------------------------

IMPORT_FIELDS = ("ID", "DOMAIN", "UUID", "STATUS", "MESSAGE")
IMPORT_COLUMNS = (
    Column("ID", lambda r: "-" if field(r, "ID") == "-1" else field(r, "ID"), right=True),
    Column("DOMAIN", lambda r: field(r, "DOMAIN")),
    Column("STATUS", lambda r: field(r, "STATUS")),
    Column("MESSAGE", lambda r: field(r, "MESSAGE", "-")),
)


def import_element(results: list[dict[str, Any]]) -> etree._Element:
    """The answer of one.host.importvm as ``<IMPORTS><IMPORT><ID/>...</IMPORT></IMPORTS>``."""
    root = etree.Element("IMPORTS")
    for result in results:
        item = etree.SubElement(root, "IMPORT")
        for name in IMPORT_FIELDS:
            etree.SubElement(item, name).text = str(result.get(name, ""))
    return root


def import_domains(ctx: Context, args: argparse.Namespace) -> int:
    """``vm import HOST [DOMAIN... | --all]``: one line per domain; exit status 1 when one failed."""
    if bool(args.domains) == args.all:
        raise UsageError("name the domains to import, or give --all")
    answer = ctx.call("one.host.importvm", ctx.resolve(HOSTS, args.host), list(args.domains), args.all)
    results: list[dict[str, Any]] = list(answer) if isinstance(answer, list) else []
    if ctx.output == "json":
        ctx.print(json.dumps(results, indent=2))
    elif ctx.output == "xml":
        ctx.print(pretty_xml(import_element(results)))
    else:
        ctx.print(render_table(IMPORT_COLUMNS, import_element(results).findall("IMPORT")))
    return 1 if any(r.get("STATUS") == "failed" for r in results) else 0


def sched_add(ctx: Context, args: argparse.Namespace) -> int:
    template = ctx.read_template(args.file)
    ctx.print_id(ctx.call("one.vm.schedadd", ctx.resolve(VMS, args.vm), template.render()))
    return 0


def sched_update(ctx: Context, args: argparse.Namespace) -> int:
    template = ctx.read_template(args.file)
    ctx.call("one.vm.schedupdate", ctx.resolve(VMS, args.vm), args.sa_id, template.render())
    return 0


def sched_delete(ctx: Context, args: argparse.Namespace) -> int:
    ctx.call("one.vm.scheddelete", ctx.resolve(VMS, args.vm), args.sa_id)
    return 0


RESTORE_POLL = 0.5  # seconds between two looks at a waited-for restore
RESTORE_ENDED = {"done": 0, "failed": 1, "interrupted": 1, "cancelled": 1, "given_up": 1}


def restore(ctx: Context, args: argparse.Namespace) -> int:
    """``vm restore VM IMAGE [--increment N] [--disk-id N] [--wait]``: queue an in-place restore (the VM must
    be powered off); --wait follows it to its end."""
    vm_id = ctx.resolve(VMS, args.vm)
    image_id = ctx.resolve(IMAGES, args.image)
    ctx.call("one.vm.restore", vm_id, image_id, args.increment, args.disk_id)
    if not args.wait:
        ctx.print(f"restore of VM {vm_id} from image {image_id}: queued")
        return 0
    deadline = time.monotonic() + args.wait_timeout
    while True:
        status = ctx.call("vmsched.vm.restorestatus", vm_id)
        assert isinstance(status, dict)
        state, message = str(status["STATE"]), str(status.get("MESSAGE") or "")
        if state in RESTORE_ENDED:
            ctx.print(f"restore of VM {vm_id}: {state}: {message}".rstrip(": "))
            return RESTORE_ENDED[state]
        if time.monotonic() > deadline:
            ctx.print(f"restore of VM {vm_id}: still {state} after {args.wait_timeout:g} s")
            return 1
        time.sleep(RESTORE_POLL)


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser("vm", help="virtual machines (onevm)", parents=[common])
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    p = sub.add_parser("create", help="register a VM from a template file", parents=[common])
    p.add_argument("file", metavar="FILE", help="template file, - for standard input")
    p.add_argument("--hold", action="store_true", help="create it on hold")
    p.set_defaults(handler=create)

    p = sub.add_parser("list", help="list my VMs and my groups' VMs", parents=[common])
    p.add_argument("--all", action="store_true", help="every VM I may see")
    p.set_defaults(handler=list_vms)

    add_id_command(sub, common, "show", "show a VM", "vm", show)
    add_update_command(sub, common, "update", "replace (or --append to) the VM's USER_TEMPLATE", "vm", update)
    add_update_command(sub, common, "updateconf", "change the VM configuration (BACKUP_CONFIG, ...)", "vm", updateconf)

    p = add_id_command(sub, common, "rename", "rename a VM", "vm", rename)
    p.add_argument("name", metavar="NAME")

    p = add_id_command(sub, common, "deploy", "bind a VM to the host where its libvirt domain runs", "vm", deploy)
    p.add_argument("host", metavar="HOST", help="host id or name")

    p = sub.add_parser(
        "import", help="register a host's libvirt domains as VMs (again: refresh them)", parents=[common]
    )
    p.add_argument("host", metavar="HOST", help="host id or name")
    p.add_argument("domains", metavar="DOMAIN", nargs="*", help="domain name or UUID")
    p.add_argument("--all", action="store_true", help="every domain of the host")
    p.set_defaults(handler=import_domains)

    backup.add_commands(sub, common)

    p = add_id_command(sub, common, "restore",
                       "restore a powered-off VM's disks in place from one of its backups (onevm restore)", "vm", restore)
    p.add_argument("image", metavar="IMAGE", help="backup image id or name")
    p.add_argument("--increment", type=int, default=-1, metavar="N", help="increment to restore (default: the last)")
    p.add_argument("--disk-id", type=int, default=-1, metavar="N", help="restore only this disk (default: all)")
    p.add_argument("--wait", action="store_true", help="wait for the restore to end; exit 1 if it failed")
    p.add_argument("--wait-timeout", type=float, default=6 * 3600.0, help="seconds --wait waits at most")

    add_id_command(sub, common, "delete", "unregister a VM (its libvirt domain is left alone)", "vm", delete)

    p = add_id_command(
        sub, common, "sched-add", "schedule an action (a file holding one SCHED_ACTION)", "vm", sched_add
    )
    p.add_argument("file", metavar="FILE", help="template file, - for standard input")
    p = add_id_command(sub, common, "sched-update", "change a scheduled action (merged into it)", "vm", sched_update)
    p.add_argument("sa_id", metavar="SA_ID", type=int, help="scheduled action id")
    p.add_argument("file", metavar="FILE", help="file holding one SCHED_ACTION, - for standard input")
    p = add_id_command(sub, common, "sched-delete", "delete a scheduled action", "vm", sched_delete)
    p.add_argument("sa_id", metavar="SA_ID", type=int, help="scheduled action id")
