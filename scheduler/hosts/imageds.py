"""Image datastores (``TYPE = IMAGE_DS``, ``DS_MAD = fs``): restored disks as image files in a directory on
a host.

The directory is ``BASE_PATH`` (default ``/var/lib/vmsched/datastores/<id>``) on the first host named by
``BRIDGE_LIST`` (OpenNebula's list of the hosts that reach a datastore), reached over SSH like any host;
without ``BRIDGE_LIST`` it is on the scheduler's own machine. An image of id ``n`` is the file
``<BASE_PATH>/<n>.<format>``.

Ceph image datastores (``DS_MAD = ceph``, ``POOL_NAME``, reached with the datastore's ``CEPH_USER``, ``CEPH_KEY``,
``CEPH_CONF``, ``CEPH_HOST`` from the same host) are monitored: ``ceph df`` gives the pool's stored bytes and what it
may still take (``max_avail``), LIMIT_MB applied. Restores write only into ``fs`` ones in this version.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from drivers.commands import Runner
from drivers.datastore import Capacity
from drivers.datastore.base import MIB, TreeDatastore, apply_limit, int_attribute
from drivers.local import LocalRunner
from drivers.tm import rbdplan
from scheduler.errors import ValidationError
from scheduler.hosts.links import HostLinks
from scheduler.model.objects.datastore import Datastore
from scheduler.model.objects.host import Host
from scheduler.model.objects.states import DatastoreType
from scheduler.store.state import State

IMAGE_DRIVERS = ("fs",)  # what a restore writes into
CEPH_TIMEOUT = 60.0  # seconds for ceph df, beyond its own client timeouts


def is_image_datastore(datastore: Datastore) -> bool:
    """An image datastore vmsched restores into (files in a directory)."""
    return datastore.type == DatastoreType.IMAGE_DS and datastore.ds_mad in IMAGE_DRIVERS


def is_monitored(datastore: Datastore) -> bool:
    """An image datastore whose space vmsched watches: a directory's, or a Ceph pool's."""
    return datastore.type == DatastoreType.IMAGE_DS and datastore.ds_mad in MONITORED_DRIVERS


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
    """Space where BASE_PATH lives on its host (created when missing), or the Ceph pool's; LIMIT_MB applied."""
    return await MONITORS[datastore.ds_mad](runner_of(state, links, datastore), datastore)


async def tree_capacity(runner: Runner, datastore: Datastore) -> Capacity:
    return await TreeDatastore(datastore, runner).monitor()


def ceph_pool(datastore: Datastore) -> tuple[str, rbdplan.RbdAccess]:
    """The pool (POOL_NAME) and the access (CEPH_USER, CEPH_KEY, CEPH_CONF, CEPH_HOST) of a Ceph image datastore."""
    pool = (datastore.template.get("POOL_NAME") or "").strip()
    if not pool:
        raise ValidationError(f"datastore {datastore.id}: a Ceph image datastore needs POOL_NAME")
    try:
        rbdplan.check_name(pool, "POOL_NAME")
        access = rbdplan.check_access(rbdplan.access_from({key: datastore.template.get(key) or "" for key in rbdplan.CEPH_KEYS}))
    except ValidationError as exc:
        raise ValidationError(f"datastore {datastore.id}: {exc}") from None
    return pool, access


async def ceph_capacity(runner: Runner, datastore: Datastore) -> Capacity:
    """The pool's space by ``ceph df`` on ``runner``'s machine: used = stored, free = max_avail; LIMIT_MB applied."""
    pool, access = ceph_pool(datastore)
    result = await runner.run(rbdplan.df_argv(access), timeout=CEPH_TIMEOUT)
    stored, available = rbdplan.parse_pool_space(result.stdout, pool)
    used, free = stored // MIB, available // MIB
    return apply_limit(used + free, used, free, int_attribute(datastore, "LIMIT_MB", 0))


# the space probe of each image datastore kind vmsched watches
MONITORS: dict[str, Callable[[Runner, Datastore], Awaitable[Capacity]]] = {"fs": tree_capacity, "ceph": ceph_capacity}
MONITORED_DRIVERS = tuple(MONITORS)
