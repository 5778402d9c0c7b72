"""How each kind of object is stored: its row (id, name, owner, parent, XML body) and back."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from xml.sax.saxutils import escape as xml_escape

from lxml import etree

from scheduler.model.objects.datastore import Datastore
from scheduler.model.objects.host import Host
from scheduler.model.objects.image import Image
from scheduler.model.objects.user import User
from scheduler.model.objects.vm import Vm
from scheduler.model.objects.vmtemplate import VmTemplate
from scheduler.model.schedule import SchedAction
from scheduler.model.template import NOT_XML, Vector
from scheduler.store.sqlite import Row
from scheduler.store.state import Codec


def _owned_row(obj: Any, body: str) -> Row:
    owner = getattr(obj, "ownership", None)
    uid = owner.uid if owner is not None else 0
    gid = owner.gid if owner is not None else 0
    return Row(id=obj.id, name=obj.name, uid=uid, gid=gid, body=body, parent=-1)


class _VmOwners:
    """uid/gid of every VM as last written or loaded: the owner columns of its actions' rows.

    A scheduled action belongs to its VM's owner. Rows are encoded before a commit makes its
    objects visible, and a VM commits together with the actions of its template (allocate), so the
    owners come from the VM rows themselves rather than from the pools.
    """

    def __init__(self) -> None:
        self._owners: dict[int, tuple[int, int]] = {}

    def seen(self, row: Row) -> Row:
        self._owners[row.id] = (row.uid, row.gid)
        return row

    def of(self, vm_id: int) -> tuple[int, int]:
        return self._owners.get(vm_id, (0, 0))


def _sched_action_row(sa: SchedAction, owners: _VmOwners) -> Row:
    """The body is the SCHED_ACTION element in XML_ORDER, plus ANCHOR (not in OpenNebula's XML).

    Built as text: the engine writes one per finished run, so this is on its hot path.
    """
    body = (
        f"<SCHED_ACTION><ID>{int(sa.id)}</ID><PARENT_ID>{int(sa.parent_id)}</PARENT_ID>"
        f"<TYPE>{_xml_text(sa.type)}</TYPE><ACTION>{_xml_text(sa.action)}</ACTION><ARGS>{_xml_text(sa.args)}</ARGS>"
        f"<TIME>{int(sa.time)}</TIME><REPEAT>{int(sa.repeat)}</REPEAT><DAYS>{_xml_text(sa.days)}</DAYS>"
        f"<END_TYPE>{int(sa.end_type)}</END_TYPE><END_VALUE>{int(sa.end_value)}</END_VALUE><DONE>{int(sa.done)}</DONE>"
        f"<MESSAGE>{_xml_text(sa.message)}</MESSAGE><WARNING>{int(sa.warning)}</WARNING>"
        f"<ANCHOR>{int(sa.anchor)}</ANCHOR></SCHED_ACTION>"
    )
    uid, gid = owners.of(sa.parent_id) if sa.type == "VM" else (0, 0)
    return Row(id=sa.id, name=sa.action, uid=uid, gid=gid, body=body, parent=sa.parent_id)


def _xml_text(value: str) -> str:
    return xml_escape(NOT_XML.sub("?", value)) if value else ""


def _sched_action_from_row(row: Row) -> SchedAction:
    element = etree.fromstring(row.body.encode())
    vector = Vector((child.tag, child.text or "") for child in element if isinstance(child.tag, str))
    anchor = vector.pop("ANCHOR")
    return SchedAction.from_vector(vector, anchor=int(anchor) if anchor else -1)


def build_codecs() -> dict[str, Codec]:
    """How every kind of object becomes a row of the store and back."""
    def decoder(cls: Any) -> Callable[[Row], Any]:
        return lambda row: cls.from_element(etree.fromstring(row.body.encode()))

    owners = _VmOwners()
    decode_vm = decoder(Vm)

    return {
        "user": Codec(
            "user",
            lambda u: Row(id=u.id, name=u.name, uid=u.id, gid=u.gid, body=u.to_xml(show_secrets=True), parent=-1),
            decoder(User),
        ),
        "host": Codec("host", lambda h: _owned_row(h, h.to_xml()), decoder(Host)),
        "datastore": Codec("datastore", lambda d: _owned_row(d, d.to_xml(show_secrets=True)), decoder(Datastore)),
        "image": Codec("image", lambda i: _owned_row(i, i.to_xml()), decoder(Image)),
        "template": Codec("VM template", lambda t: _owned_row(t, t.to_xml()), decoder(VmTemplate)),
        "vm": Codec(
            "virtual machine",
            lambda v: owners.seen(_owned_row(v, v.to_xml(storage=True))),
            lambda row: decode_vm(owners.seen(row)),
        ),
        # After "vm": loading fills ``owners`` before any action is written.
        "schedaction": Codec("scheduled action", lambda sa: _sched_action_row(sa, owners), _sched_action_from_row),
    }
