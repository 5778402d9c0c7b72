"""Image datastores (``TYPE = IMAGE_DS``, ``DS_MAD = fs``): restored disks as image files in a directory on
a host.

The directory is ``BASE_PATH`` (default ``/var/lib/vmsched/datastores/<id>``) on the first host named by
``BRIDGE_LIST`` (OpenNebula's list of the hosts that reach a datastore), reached over SSH like any host;
without ``BRIDGE_LIST`` it is on the scheduler's own machine. An image of id ``n`` is the file
``<BASE_PATH>/<n>.<format>``. Ceph image datastores would bring their own placement (a pool instead of a
directory); nothing here assumes more than "a place that has a runner and a free-space probe".
"""

from __future__ import annotations

from typing import Any

from drivers.datastore import Capacity
from drivers.datastore.base import TreeDatastore
from drivers.local import LocalRunner
from scheduler.errors import ValidationError
from scheduler.hosts.links import HostLinks
from scheduler.model.objects.datastore import Datastore
from scheduler.model.objects.host import Host
from scheduler.model.objects.states import DatastoreType
from scheduler.store.state import State

IMAGE_DRIVERS = ("fs",)


def is_image_datastore(datastore: Datastore) -> bool:
    """An image datastore vmsched keeps files in (other DS_MADs, e.g. ceph, are not handled yet)."""
    return datastore.type == DatastoreType.IMAGE_DS and datastore.ds_mad in IMAGE_DRIVERS


def bridge_host(state: State, datastore: Datastore) -> Host | None:
    """The host holding the datastore's directory (first of BRIDGE_LIST); None for the scheduler's machine.
    ValidationError when BRIDGE_LIST names no registered host."""
    names = (datastore.template.get("BRIDGE_LIST") or "").split()
    if not names:
        return None
    host = next((h for h in state.hosts.all() if h.name == names[0] or str(h.id) == names[0]), None)
    if host is None:
        raise ValidationError(f"datastore {datastore.id}: BRIDGE_LIST names {names[0]!r}, which is not a "
                              "registered host")
    return host


def runner_of(state: State, links: HostLinks, datastore: Datastore) -> Any:
    host = bridge_host(state, datastore)
    return links.runner(host) if host is not None else LocalRunner()


def image_path(datastore: Datastore, image_id: int, fmt: str) -> str:
    return f"{datastore.base_path}/{image_id}.{fmt}"


async def monitor(state: State, links: HostLinks, datastore: Datastore) -> Capacity:
    """Space where BASE_PATH lives on its host (created when missing), LIMIT_MB applied."""
    return await TreeDatastore(datastore, runner_of(state, links, datastore)).monitor()
