"""``vmsched host``: the hypervisors vmsched reaches over SSH (OpenNebula's onehost)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from lxml import etree

from scheduler.cli.client import UsageError
from scheduler.cli.context import UPDATE_MERGE, Context, Kind, add_id_command, add_update_command, update_type
from scheduler.cli.states import HOST_STATE_SHORT, HOST_STATES, name_of
from scheduler.cli.tables import Column, field, ids, join_sections, render_fields, render_template
from scheduler.errors import VmschedError
from scheduler.model.template import Template

HOSTS = Kind("host", "one.hostpool.info", "HOST_POOL", "HOST")
HOST_ENABLED, HOST_DISABLED = 0, 1

_SSH_TARGET = re.compile(
    r"(?:(?P<user>[^@\s]+)@)?(?:\[(?P<ipv6>[0-9A-Fa-f:.%\w]+)\]|(?P<host>[^@:\s\[\]]+))(?::(?P<port>\d+))?"
)


def parse_ssh_target(target: str) -> tuple[str | None, str, int | None]:
    """``[user@]address[:port]`` (IPv6 as ``[addr]``) -> (user, address, port)."""
    match = _SSH_TARGET.fullmatch(target)
    if not match:
        raise UsageError(f"--ssh {target!r}: expected [user@]address[:port] (IPv6 as [address]:port)")
    port = int(match["port"]) if match["port"] else None
    if port is not None and not 0 < port < 65536:
        raise UsageError(f"--ssh {target!r}: port {port} is out of range")
    return match["user"], match["ipv6"] or match["host"], port


def connection_template(args: argparse.Namespace) -> Template:
    """The host TEMPLATE attributes vmsched's SSH layer reads."""
    user, address, port = parse_ssh_target(args.ssh)
    template = Template()
    template.add("SSH_HOST", address)
    if port is not None:
        template.add("SSH_PORT", port)
    if user:
        template.add("SSH_USER", user)
    if args.key:
        template.add("SSH_KEY", str(Path(args.key).expanduser().absolute()))
    if args.libvirt_uri:
        template.add("LIBVIRT_URI", args.libvirt_uri)
    if args.accept_hostkey:
        template.add("ACCEPT_HOSTKEY", "YES")
    return template


def _address(host: etree._Element) -> str:
    address = field(host, "TEMPLATE/SSH_HOST", "-")
    user, port = field(host, "TEMPLATE/SSH_USER"), field(host, "TEMPLATE/SSH_PORT")
    if ":" in address:
        address = f"[{address}]"
    return f"{user + '@' if user else ''}{address}{':' + port if port else ''}"


COLUMNS = (
    Column("ID", lambda h: field(h, "ID"), right=True),
    Column("NAME", lambda h: field(h, "NAME")),
    Column("SSH", _address),
    Column("VMS", lambda h: str(len(ids(h, "VMS"))), right=True),
    Column("STAT", lambda h: name_of(HOST_STATE_SHORT, field(h, "STATE"))),
)


def render_host(host: etree._Element) -> str:
    info = [
        ("ID", field(host, "ID")),
        ("NAME", field(host, "NAME")),
        ("STATE", name_of(HOST_STATES, field(host, "STATE"))),
        ("SSH", _address(host)),
        ("LIBVIRT URI", field(host, "TEMPLATE/LIBVIRT_URI", "-")),
    ]
    error = field(host, "TEMPLATE/ERROR")
    if error:
        info.append(("ERROR", error))
    vms = ids(host, "VMS")
    return join_sections(
        [
            render_fields(f"HOST {field(host, 'ID')} INFORMATION", info),
            render_template("HOST TEMPLATE", host.find("TEMPLATE")),
            f"VIRTUAL MACHINES\nIDS: {','.join(vms) if vms else '-'}\n",
        ]
    )


# -- handlers --------------------------------------------------------------------------------------


def create(ctx: Context, args: argparse.Namespace) -> int:
    template = connection_template(args)
    host_id = ctx.call("one.host.allocate", args.name, "kvm", "kvm", -1)
    try:
        ctx.call("one.host.update", host_id, template.render(), UPDATE_MERGE)
    except VmschedError:
        _forget(ctx, host_id)  # do not leave behind a host vmsched does not know how to reach
        raise
    ctx.print_id(host_id)
    if args.accept_hostkey:
        ctx.tell_fingerprint("host", "one.host.info", host_id)
    return 0


def _forget(ctx: Context, host_id: object) -> None:
    try:
        ctx.call("one.host.delete", host_id)
    except VmschedError as exc:
        ctx.err.write(f"host {host_id} was created but could not be removed again: {exc}\n")


def list_hosts(ctx: Context, args: argparse.Namespace) -> int:
    ctx.print_pool(HOSTS, ctx.call("one.hostpool.info"), COLUMNS)
    return 0


def show(ctx: Context, args: argparse.Namespace) -> int:
    ctx.print_object(ctx.call("one.host.info", ctx.resolve(HOSTS, args.host), False), render_host)
    return 0


def update(ctx: Context, args: argparse.Namespace) -> int:
    template = ctx.read_template(args.file)
    ctx.call("one.host.update", ctx.resolve(HOSTS, args.host), template.render(), update_type(args.append))
    return 0


def accept_hostkey(ctx: Context, args: argparse.Namespace) -> int:
    host_id = ctx.resolve(HOSTS, args.host)
    ctx.call("one.host.update", host_id, 'ACCEPT_HOSTKEY = "YES"', UPDATE_MERGE)
    ctx.tell_fingerprint("host", "one.host.info", host_id)
    return 0


def enable(ctx: Context, args: argparse.Namespace) -> int:
    ctx.call("one.host.status", ctx.resolve(HOSTS, args.host), HOST_ENABLED)
    return 0


def disable(ctx: Context, args: argparse.Namespace) -> int:
    ctx.call("one.host.status", ctx.resolve(HOSTS, args.host), HOST_DISABLED)
    return 0


def delete(ctx: Context, args: argparse.Namespace) -> int:
    ctx.call("one.host.delete", ctx.resolve(HOSTS, args.host))
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser("host", help="hypervisors (onehost)", parents=[common])
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    p = sub.add_parser("create", help="register a host reachable over SSH", parents=[common])
    p.add_argument("name", metavar="NAME")
    p.add_argument("--ssh", required=True, metavar="[USER@]ADDRESS[:PORT]", help="how vmsched reaches the host")
    p.add_argument("--key", metavar="FILE", help="SSH private key (a path on the vmsched machine)")
    p.add_argument("--libvirt-uri", metavar="URI", help="libvirt URI (default: derived from --ssh)")
    p.add_argument("--accept-hostkey", action="store_true", help="trust the host key presented on first contact")
    p.set_defaults(handler=create)

    sub.add_parser("list", help="list hosts", parents=[common]).set_defaults(handler=list_hosts)
    add_id_command(sub, common, "show", "show a host", "host", show)
    add_update_command(sub, common, "update", "replace (or --append to) the host template", "host", update)
    add_id_command(sub, common, "accept-hostkey",
                   "trust the key the host presents now (never replaces another recorded key)", "host", accept_hostkey)
    add_id_command(sub, common, "enable", "enable a host", "host", enable)
    add_id_command(sub, common, "disable", "disable a host (no new backups start on it)", "host", disable)
    add_id_command(sub, common, "delete", "unregister a host", "host", delete)
