"""Readable text from object XML: tables for pools, labelled sections for ``show``, JSON, pretty XML."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from lxml import etree

from scheduler.errors import VmschedError
from scheduler.model.template import from_element

_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, remove_blank_text=True)
_LABEL_WIDTH = 20


def parse_xml(text: str) -> etree._Element:
    try:
        return etree.fromstring(text.encode(), _PARSER)
    except (etree.XMLSyntaxError, ValueError) as exc:
        raise VmschedError(f"the daemon sent malformed XML: {exc}") from None


def field(element: etree._Element, path: str, default: str = "") -> str:
    """The text at ``path`` below ``element`` (``default`` when absent or empty)."""
    found = element.find(path)
    return found.text if found is not None and found.text else default


def ids(element: etree._Element, path: str) -> list[str]:
    """The ``<ID>`` children of the element at ``path`` (``<VMS><ID>1</ID>...</VMS>``)."""
    return [child.text or "" for child in element.findall(f"{path}/ID")]


def last_host(vm: etree._Element) -> str:
    records = vm.findall("HISTORY_RECORDS/HISTORY")
    return field(records[-1], "HOSTNAME", "-") if records else "-"


def format_time(epoch: str) -> str:
    """An epoch in local time, ``-`` for 0 or nothing."""
    try:
        seconds = int(epoch)
    except ValueError:
        return epoch or "-"
    if seconds <= 0:
        return "-"
    return datetime.fromtimestamp(seconds, tz=UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def time_until(seconds: int) -> str:
    """A positive delay as onevm says it: ``3 days``, ``1 hour``, ``12 minutes`` (at least 1 minute)."""
    for unit, length in (("day", 86400), ("hour", 3600)):
        if seconds >= length:
            count = seconds // length
            return f"{count} {unit}{'s' if count != 1 else ''}"
    minutes = max(1, -(-seconds // 60))
    return f"{minutes} minute{'s' if minutes != 1 else ''}"


def format_mb(megabytes: str) -> str:
    """``1536`` -> ``1.5G``, as OpenNebula prints sizes kept in MB."""
    try:
        value = float(megabytes)
    except ValueError:
        return megabytes or "-"
    for unit in ("M", "G", "T"):
        if abs(value) < 1024 or unit == "T":
            text = f"{value:.1f}".removesuffix(".0")
            return f"{text}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Column:
    header: str
    value: Callable[[Any], str]  # of one row: an element of a pool, or a dict of a JSON answer
    right: bool = False


def render_table(columns: Sequence[Column], items: Iterable[Any]) -> str:
    rows = [[column.value(item) for column in columns] for item in items]
    widths = [max([len(c.header), *(len(row[i]) for row in rows)]) for i, c in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.rjust(width) if column.right else cell.ljust(width)
            for cell, width, column in zip(cells, widths, columns, strict=True)
        ]
        return " ".join(parts).rstrip()

    return "\n".join([line([c.header for c in columns]), *(line(row) for row in rows)]) + "\n"


def render_fields(title: str, pairs: Iterable[tuple[str, str]]) -> str:
    lines = [title, *(f"{label:<{_LABEL_WIDTH}}: {value}" for label, value in pairs)]
    return "\n".join(lines) + "\n"


def render_template(title: str, element: etree._Element | None) -> str:
    """A section holding ``element``'s children in template syntax."""
    body = from_element(element).render() if element is not None else ""
    return f"{title}\n{body}"


def join_sections(sections: Iterable[str]) -> str:
    return "\n".join(section.rstrip("\n") + "\n" for section in sections if section)


def pretty_xml(element: etree._Element) -> str:
    return etree.tostring(element, pretty_print=True, encoding="unicode")


def to_json(element: etree._Element, list_tags: frozenset[str] = frozenset()) -> dict[str, object]:
    """``<A><B>1</B><B>2</B></A>`` -> ``{"A": {"B": ["1", "2"]}}``; tags in ``list_tags`` are always lists."""
    return {element.tag: _json_value(element, list_tags)}


def _json_value(element: etree._Element, list_tags: frozenset[str]) -> object:
    children = [child for child in element if isinstance(child.tag, str)]
    if not children:
        return element.text or ""
    value: dict[str, object] = {}
    for child in children:
        item = _json_value(child, list_tags)  # a str or a dict, never a list
        existing = value.get(child.tag)
        if existing is None:
            value[child.tag] = [item] if child.tag in list_tags else item
        elif isinstance(existing, list):
            existing.append(item)
        else:
            value[child.tag] = [existing, item]
    return value


def number_of(action: etree._Element, name: str) -> int | None:
    text = field(action, name).strip()
    return int(text) if text.lstrip("-").isdigit() else None
