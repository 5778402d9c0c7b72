"""Commands that do not call a running daemon: checking files locally (templates, sched.conf, schedules),
and ``serve`` which is the daemon."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from scheduler.cli import schedule
from scheduler.cli.context import Context
from scheduler.cli.tables import pretty_xml, to_json
from scheduler.config import load_config

DEFAULT_STATE_DIR = "/var/lib/vmsched"


def add_template_format(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """``vmsched template format FILE``, under the ``template`` command."""
    p = sub.add_parser("format", help="print a template file normalised (checks its syntax; no daemon needed)",
                       parents=[common])
    p.add_argument("file", metavar="FILE", help="template file, - for standard input (--xml: print the XML form)")
    p.set_defaults(handler=template_format)


def template_format(ctx: Context, args: argparse.Namespace) -> int:
    """Print the template as vmsched stores it (text, or with --xml/--json its XML form).

    A syntax error is a TemplateError ("FILE:LINE:COL: message", exit 2).
    """
    template = ctx.read_template(args.file)
    if ctx.output == "xml":
        ctx.print(pretty_xml(template.to_xml()))
    elif ctx.output == "json":
        ctx.print(json.dumps(to_json(template.to_xml()), indent=2))
    else:
        ctx.out.write(template.render())
    return 0


def config_check(ctx: Context, args: argparse.Namespace) -> int:
    path = Path(args.file)
    load_config(path)  # ConfigError (every problem at once) is reported by main
    ctx.print(f"{path}: OK")
    return 0


def serve(ctx: Context, args: argparse.Namespace) -> int:
    from scheduler.daemon.service import run_daemon  # start-up: +230 ms on every command (-X importtime)

    state_dir = Path(args.state_dir or os.environ.get("VMSCHED_STATE_DIR") or DEFAULT_STATE_DIR)
    config = Path(args.config) if args.config else None
    return run_daemon(state_dir, config, demo=args.demo) or 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    p = commands.add_parser("serve", help="run the vmsched daemon", parents=[common])
    p.add_argument("--state-dir", metavar="DIR", help=f"$VMSCHED_STATE_DIR, else {DEFAULT_STATE_DIR}")
    p.add_argument("-c", "--config", metavar="FILE", help="sched.conf")
    p.add_argument("--demo", action=argparse.BooleanOptionalAction, default=None,
                   help="set up the demo on a fresh state: this machine as a host, an fs backup datastore in the "
                   "state dir and a tiny VM backed up hourly (default: only without a configuration file)")
    p.set_defaults(handler=serve)

    # `template format` lives with the VM template commands (scheduler/cli/templates.py)

    parser = commands.add_parser("config", help="work on sched.conf", parents=[common])
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = sub.add_parser("check", help="validate a sched.conf file", parents=[common])
    p.add_argument("file", metavar="FILE")
    p.set_defaults(handler=config_check)

    schedule.register(commands, common)
