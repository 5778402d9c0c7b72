"""Helpers shared by the API modules: templates from requests, names, pool slices."""

from __future__ import annotations

from typing import Any

from lxml import etree

from scheduler.api.permissions import Caller, visible
from scheduler.errors import ValidationError
from scheduler.model.template import Template


def parse_request_template(text: str, what: str) -> Template:
    """A template argument in text or XML form; errors name the argument."""
    return Template.parse(text, source=what)


def update_template(current: Template, text: str, merge: int, what: str) -> Template:
    """one.*.update: type 0 replaces the template, type 1 merges into it."""
    if merge not in (0, 1):
        raise ValidationError(f"update type must be 0 (replace) or 1 (merge), got {merge}")
    incoming = parse_request_template(text, what)
    if merge == 0:
        return incoming
    result = current.copy()
    result.merge(incoming)
    return result


def pool_slice(caller: Caller, objects: list[Any], pool_filter: int, start: int, end: int) -> list[Any]:
    """OpenNebula pool arguments: filter flag, then an id range (-1 = no bound)."""
    if pool_filter < -3:
        raise ValidationError(f"filter flag must be -3, -2, -1 or a user id, got {pool_filter}")
    chosen = []
    for obj in objects:
        if not visible(caller, obj.ownership.uid, pool_filter):
            continue
        if start >= 0 and obj.id < start:
            continue
        if end >= 0 and obj.id > end:
            continue
        chosen.append(obj)
    return chosen


def xml_string(element: etree._Element) -> str:
    return etree.tostring(element, encoding="unicode")
