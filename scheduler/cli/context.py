"""What every command handler gets: the daemon connection, the output format and the streams."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from lxml import etree

from scheduler.cli.client import Client, UsageError
from scheduler.cli.tables import Column, parse_xml, pretty_xml, render_table, to_json
from scheduler.errors import NotFound, VmschedError
from scheduler.model.template import Template

UPDATE_REPLACE, UPDATE_MERGE = 0, 1


def update_type(append: bool) -> int:
    """The ``type`` argument of OpenNebula's update methods."""
    return UPDATE_MERGE if append else UPDATE_REPLACE

# OpenNebula pool filters: every object, or the caller's and their groups'.
FILTER_ALL, FILTER_MINE_AND_GROUPS = -2, -1


@dataclass(frozen=True)
class Kind:
    """One kind of object: how to list it and what its pool and items are called."""

    noun: str
    pool_method: str
    pool_tag: str
    item_tag: str
    pool_args: tuple[object, ...] = ()


@dataclass
class Context:
    connect: Callable[[], Client]
    output: str = "table"  # table | json | xml
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)
    stdin: TextIO = field(default_factory=lambda: sys.stdin)
    _client: Client | None = None

    def client(self) -> Client:
        """The daemon connection, opened at the first use."""
        if self._client is None:
            self._client = self.connect()
        return self._client

    def call(self, method: str, *args: object) -> object:
        return self.client().call(method, *args)

    def close(self) -> None:
        """Close the connection if one was opened."""
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- naming objects --------------------------------------------------------------------------
    def resolve(self, kind: Kind, ref: str) -> int:
        """An id given as a number or as the name of exactly one object of ``kind``."""
        if ref.lstrip("-").isdigit():
            return int(ref)
        pool = parse_xml(str(self.call(kind.pool_method, *kind.pool_args)))
        matches = [item for item in pool.findall(kind.item_tag) if item.findtext("NAME") == ref]
        if not matches:
            raise NotFound(f"no {kind.noun} named {ref!r}")
        if len(matches) > 1:
            found = ", ".join(item.findtext("ID") or "?" for item in matches)
            raise VmschedError(f"{len(matches)} {kind.noun}s are named {ref!r} (ids {found}): use an id")
        return int(matches[0].findtext("ID") or "")

    # -- input -----------------------------------------------------------------------------------
    def read_text(self, path: str) -> str:
        """The content of ``path``, or of standard input for ``-``."""
        if path == "-":
            return self.stdin.read()
        try:
            return Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read {path}: {exc}") from None

    def read_template(self, path: str) -> Template:
        """A template file, checked here so syntax errors carry file:line:col."""
        return Template.parse(self.read_text(path), "<stdin>" if path == "-" else path)

    # -- output ----------------------------------------------------------------------------------
    def print(self, text: str) -> None:
        self.out.write(text if text.endswith("\n") else text + "\n")

    def print_pool(self, kind: Kind, xml_text: object, columns: Sequence[Column]) -> None:
        pool = parse_xml(str(xml_text))
        if self.output == "xml":
            self.print(pretty_xml(pool))
        elif self.output == "json":
            data = to_json(pool, frozenset({kind.item_tag}))
            items = data[pool.tag]
            body: dict[str, Any] = items if isinstance(items, dict) else {}  # an empty pool is ""
            data[pool.tag] = {kind.item_tag: [], **body}
            self.print(json.dumps(data, indent=2))
        else:
            self.print(render_table(columns, pool.findall(kind.item_tag)))

    def print_object(self, xml_text: object, render: Callable[[etree._Element], str]) -> None:
        element = parse_xml(str(xml_text))
        if self.output == "xml":
            self.print(pretty_xml(element))
        elif self.output == "json":
            self.print(json.dumps(to_json(element), indent=2))
        else:
            self.print(render(element))

    def tell_fingerprint(self, kind: str, info_method: str, object_id: object) -> None:
        """The host key now trusted for a host or a backup datastore's server, on standard error (standard
        output stays what scripts parse)."""
        element = etree.fromstring(str(self.call(info_method, object_id, False)).encode())
        fingerprint = element.findtext("TEMPLATE/SSH_HOSTKEY_FINGERPRINT")
        if fingerprint:
            self.err.write(f"{kind} {element.findtext('NAME')}: trusting host key {fingerprint}\n")

    def print_id(self, object_id: object) -> None:
        """What a create command prints: ``ID: 5`` (or ``{"ID": 5}``)."""
        if self.output == "json":
            self.print(json.dumps({"ID": object_id}))
        elif self.output == "xml":
            self.print(f"<ID>{object_id}</ID>")
        else:
            self.print(f"ID: {object_id}")


# -- declaring commands ------------------------------------------------------------------------------


def add_id_command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
    name: str,
    text: str,
    dest: str,
    handler: Callable[[Context, argparse.Namespace], int],
) -> argparse.ArgumentParser:
    """``vmsched <kind> <name> <ID|NAME>``; returns the parser for further arguments."""
    parser = sub.add_parser(name, help=text, description=text, parents=[common])
    parser.add_argument(dest, metavar=dest.upper(), help="id or name")
    parser.set_defaults(handler=handler)
    return parser


def add_update_command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
    name: str,
    text: str,
    dest: str,
    handler: Callable[[Context, argparse.Namespace], int],
) -> argparse.ArgumentParser:
    parser = add_id_command(sub, common, name, text, dest, handler)
    parser.add_argument("file", metavar="FILE", help="template file, - for standard input")
    parser.add_argument("--append", action="store_true", help="merge into the template instead of replacing it")
    return parser
