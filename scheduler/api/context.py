"""What every API handler gets: the objects, the configuration, the clock; and authentication."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape as xml_escape

from scheduler.api.auth import SessionCache, split_session, verify_password
from scheduler.api.permissions import Caller
from scheduler.api.render import XmlCache
from scheduler.config import Config
from scheduler.engine.clock import Clock
from scheduler.errors import AuthError
from scheduler.model.objects.datastore import Datastore
from scheduler.model.objects.host import Host
from scheduler.model.objects.image import Image
from scheduler.model.objects.user import User
from scheduler.model.objects.vm import Vm
from scheduler.model.schedule import SchedAction
from scheduler.model.template import NOT_XML, Vector
from scheduler.store.sqlite import Row
from scheduler.store.state import Codec, State

log = logging.getLogger(__name__)


@dataclass
class Context:
    state: State
    config: Config
    clock: Clock
    state_dir: Path
    engine: Any = None  # scheduler.engine.loop.Engine once the daemon runs one
    links: Any = None  # scheduler.hosts.links.HostLinks: runners and libvirt connections per host
    progress: Any = None  # scheduler.engine.progress.ProgressBoard: how far the running backups are
    xml: XmlCache = field(default_factory=XmlCache)

    def __post_init__(self) -> None:
        self.state.listeners.append(self.xml.forget)

    def now(self) -> int:
        return int(self.clock.now())


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
    from lxml import etree

    element = etree.fromstring(row.body.encode())
    vector = Vector((child.tag, child.text or "") for child in element if isinstance(child.tag, str))
    anchor = vector.pop("ANCHOR")
    return SchedAction.from_vector(vector, anchor=int(anchor) if anchor else -1)


def build_codecs() -> dict[str, Codec]:
    from lxml import etree

    from scheduler.model.objects.vmtemplate import VmTemplate

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


def make_authenticator(ctx: Context, sessions: SessionCache) -> Callable[[Any], Awaitable[Caller]]:
    async def authenticate(session: Any) -> Caller:
        name, password = split_session(session)
        user = _user_named(ctx.state, name)
        cached = sessions.lookup(session) if user is not None else None
        if user is None or not user.enabled:
            raise AuthError("[one.auth] User couldn't be authenticated, aborting call.")
        if cached != user.id:
            if not verify_password(password, user.password):
                log.warning("failed login for user %s", name)
                raise AuthError("[one.auth] User couldn't be authenticated, aborting call.")
            sessions.remember(session, user.id)
        return Caller(user.id, user.name, user.gid, frozenset([user.gid, *user.groups]))

    ctx.state.listeners.append(lambda kind, obj_id, obj: sessions.forget_user(obj_id) if kind == "user" else None)
    return authenticate


def _user_named(state: State, name: str) -> User | None:
    for user in state.pools["user"].values():
        if user.name == name:
            return user
    return None
