"""``vmsched user``: who may call the API (OpenNebula's oneuser)."""

from __future__ import annotations

import argparse

from lxml import etree

from scheduler.cli.client import UsageError
from scheduler.cli.context import Context, Kind, add_id_command
from scheduler.cli.tables import Column, field, join_sections, render_fields, render_template

USERS = Kind("user", "one.userpool.info", "USER_POOL", "USER")
SELF = -1
_STDIN_HELP = "read the password from the first line of standard input (keeps it out of ps and shell history)"


def _enabled(user: etree._Element) -> str:
    return "yes" if field(user, "ENABLED", "1") == "1" else "no"


COLUMNS = (
    Column("ID", lambda u: field(u, "ID"), right=True),
    Column("NAME", lambda u: field(u, "NAME")),
    Column("GROUP", lambda u: field(u, "GNAME")),
    Column("AUTH", lambda u: field(u, "AUTH_DRIVER")),
    Column("ENABLED", _enabled),
)


def render_user(user: etree._Element) -> str:
    """The password hash is left out on purpose."""
    return join_sections([
        render_fields(f"USER {field(user, 'ID')} INFORMATION", [
            ("ID", field(user, "ID")),
            ("NAME", field(user, "NAME")),
            ("GROUP", field(user, "GNAME")),
            ("AUTH_DRIVER", field(user, "AUTH_DRIVER")),
            ("ENABLED", _enabled(user)),
        ]),
        render_template("USER TEMPLATE", user.find("TEMPLATE")),
    ])  # fmt: skip


def password(ctx: Context, args: argparse.Namespace) -> str:
    """The PASSWORD argument, or with ``--stdin`` the first line of standard input."""
    if args.stdin == (args.password is not None):
        raise UsageError("give the password either as an argument or with --stdin, not both")
    value = ctx.stdin.readline().rstrip("\r\n") if args.stdin else args.password
    if not value:
        raise UsageError("the password is empty")
    return value


def create(ctx: Context, args: argparse.Namespace) -> int:
    ctx.print_id(ctx.call("one.user.allocate", args.name, password(ctx, args), "core", []))
    return 0


def list_users(ctx: Context, args: argparse.Namespace) -> int:
    ctx.print_pool(USERS, ctx.call("one.userpool.info"), COLUMNS)
    return 0


def show(ctx: Context, args: argparse.Namespace) -> int:
    user_id = SELF if args.user is None else ctx.resolve(USERS, args.user)
    ctx.print_object(ctx.call("one.user.info", user_id), render_user)
    return 0


def passwd(ctx: Context, args: argparse.Namespace) -> int:
    new_password = password(ctx, args)
    ctx.call("one.user.passwd", ctx.resolve(USERS, args.user), new_password)
    return 0


def _password_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("password", metavar="PASSWORD", nargs="?", help="the password (or use --stdin)")
    parser.add_argument("--stdin", action="store_true", help=_STDIN_HELP)


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser("user", help="API users (oneuser)", parents=[common])
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    p = sub.add_parser("create", help="create a user", parents=[common])
    p.add_argument("name", metavar="NAME")
    _password_arguments(p)
    p.set_defaults(handler=create)

    sub.add_parser("list", help="list users", parents=[common]).set_defaults(handler=list_users)

    p = sub.add_parser("show", help="show a user (default: myself)", parents=[common])
    p.add_argument("user", metavar="USER", nargs="?", help="id or name")
    p.set_defaults(handler=show)

    p = add_id_command(sub, common, "passwd", "change a user's password", "user", passwd)
    _password_arguments(p)
