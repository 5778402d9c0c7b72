"""The ``vmsched`` command: a client of the daemon's XML-RPC API, plus commands that need no daemon.

Errors are caught here, at one edge: the message goes to standard error and the exit status is 1 for
a failed call or an unreachable daemon, 2 for bad arguments and unusable local files.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from scheduler.cli import bench, datastores, hosts, images, offline, templates, users, vms
from scheduler.cli.client import (
    DEFAULT_ENDPOINT,
    DEFAULT_TIMEOUT,
    Client,
    UsageError,
    auth_file,
    read_session,
    resolve_endpoint,
)
from scheduler.cli.context import Context
from scheduler.errors import ConfigError, TemplateError, VmschedError

EXIT_FAILED, EXIT_USAGE = 1, 2

_EPILOG = f"""\
The daemon is at --endpoint, else $VMSCHED_ENDPOINT, else $ONE_XMLRPC, else {DEFAULT_ENDPOINT}.
Credentials: the file named by $VMSCHED_AUTH, else $ONE_AUTH, else ~/.one/one_auth, holding one
line "user:password". Objects may be named by id or by name.
"""


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds: {text!r}")
    return value


def _global_options(at_top: bool) -> argparse.ArgumentParser:
    """Options accepted before or after the command; below the top they only override when given."""
    parser = argparse.ArgumentParser(add_help=False)

    def default(value: object) -> object:
        return value if at_top else argparse.SUPPRESS

    parser.add_argument("--endpoint", metavar="URL", default=default(None), help="XML-RPC URL of the daemon")
    parser.add_argument(
        "--timeout", metavar="SECONDS", type=_seconds, default=default(DEFAULT_TIMEOUT), help="per call"
    )
    output = parser.add_mutually_exclusive_group()
    output.add_argument(
        "--json", dest="output", action="store_const", const="json", default=default("table"), help="JSON output"
    )
    output.add_argument(
        "--xml", dest="output", action="store_const", const="xml", default=default("table"), help="XML output"
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        default=default(False),
        help="show the libraries' Python warnings on standard error (also VMSCHED_DEBUG=1); see scheduler/entry.py",
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmsched",
        description="Backup scheduler for KVM/libvirt fleets (OpenNebula-compatible API).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_global_options(at_top=True)],
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _global_options(at_top=False)
    for module in (offline, hosts, datastores, vms, images, templates, users, bench):
        module.register(commands, common)
    return parser


def _connect(args: argparse.Namespace) -> Client:
    endpoint = resolve_endpoint(args.endpoint, os.environ)
    return Client(endpoint, read_session(auth_file(os.environ)), args.timeout)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse has printed the usage or the help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    ctx = Context(connect=lambda: _connect(args), output=args.output)
    try:
        code: int = args.handler(ctx, args)
        return code
    except ConfigError as exc:
        ctx.err.write("".join(f"{problem}\n" for problem in exc.problems))
        return EXIT_USAGE
    except (UsageError, TemplateError) as exc:
        ctx.err.write(f"{exc}\n")
        return EXIT_USAGE
    except VmschedError as exc:
        ctx.err.write(f"{exc}\n")
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (``| head``): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    finally:
        ctx.close()


__all__ = ["build_parser", "main"]
