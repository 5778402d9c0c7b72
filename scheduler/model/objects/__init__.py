"""vmsched's objects with their OpenNebula 7.0 XML: Host, Datastore, Image, Vm, User, and pools."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from lxml import etree

from scheduler.errors import ValidationError
from scheduler.model.objects.common import Element, Ownership, Permissions
from scheduler.model.objects.datastore import Datastore
from scheduler.model.objects.host import Host
from scheduler.model.objects.image import Image, Increment
from scheduler.model.objects.user import User, write_empty_quotas
from scheduler.model.objects.vm import History, Vm, split_vm_template

POOL_TAGS = {
    "host": "HOST_POOL",
    "datastore": "DATASTORE_POOL",
    "image": "IMAGE_POOL",
    "vm": "VM_POOL",
    "user": "USER_POOL",
    "template": "VMTEMPLATE_POOL",
}


def pool_element(kind: str, objects: Iterable[Any], **opts: Any) -> Element:
    """The ``*_POOL`` element of one.<kind>pool.info.

    Options: ``show_secrets`` (datastore, user); for VMs ``extended`` (default False: the short
    body of one.vmpool.info; True: vm_pool_extended.xsd) and ``sched_actions``, a mapping of VM id
    to its SCHED_ACTION bodies (extended only). For the short VM pool ``pool_xml`` is much faster.
    """
    tag = _pool_tag(kind)
    if kind == "vm" and not opts.get("extended", False):
        return etree.fromstring(pool_xml(kind, objects))
    pool = etree.Element(tag)
    if kind == "vm":
        for vm in objects:
            pool.append(vm.to_element(extended=True, sched_actions=opts.get("sched_actions", {}).get(vm.id, ())))
    elif kind == "user":
        for user in objects:
            pool.append(user.to_element(show_secrets=bool(opts.get("show_secrets", False)), quotas=False))
        write_empty_quotas(etree.SubElement(pool, "DEFAULT_USER_QUOTAS"))
    else:
        for obj in objects:
            pool.append(obj.to_element(**opts))
    return pool


def pool_xml(kind: str, objects: Iterable[Any], **opts: Any) -> str:
    """``pool_element`` serialised; the short VM pool is joined from text without building elements."""
    if kind == "vm" and not opts.get("extended", False):
        return "<VM_POOL>" + "".join([vm.short_xml() for vm in objects]) + "</VM_POOL>"
    return etree.tostring(pool_element(kind, objects, **opts), encoding="unicode")


def _pool_tag(kind: str) -> str:
    tag = POOL_TAGS.get(kind)
    if tag is None:
        raise ValidationError(f"unknown pool kind {kind!r}; expected one of: {', '.join(POOL_TAGS)}")
    return tag


__all__ = [
    "Datastore",
    "History",
    "Host",
    "Image",
    "Increment",
    "Ownership",
    "Permissions",
    "User",
    "Vm",
    "pool_element",
    "pool_xml",
    "split_vm_template",
]
