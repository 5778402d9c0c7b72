"""Pure parts of capturing Ceph RBD disks (spec §4.8) on a hypervisor: vmsched's snapshot names, the RBD
source of a domain's network disk, and the argv of ``rbd`` and of ``qemu-img`` reading an ``rbd:`` image.

Every command carries client timeouts (:class:`RbdTimeouts`): without them a cluster that is gone hangs
``rbd`` and librbd for 300 s waiting for a mon and forever waiting for an OSD; with them the command fails
with ETIMEDOUT (exit status 110). Pool, image and snapshot names are checked before they reach an argv,
and every value in a ``qemu-img`` ``rbd:`` file name is escaped, so that no template value can add an
option of its own.

vmsched's snapshots are named ``vmsched-<run>`` (a full backup's, removed after it) and
``vmsched-chain-<vm>-<n>`` (the anchor of increment ``n`` of VM ``vm``'s chain, kept until increment ``n + 1``
is recorded); only names of these forms are ever removed.

An increment of an RBD disk is stored as a qcow2 link like a file disk's (``disk.<id>.<n>`` backed by
``disk.<id>.<n-1>``): the extents ``rbd diff --from-snap`` reports between the anchor and the new snapshot,
copied from the cluster into a qcow2 whose cluster size :func:`link_cluster_size` picks for those extents. A
Ceph chain is then restored, downloaded, verified and flattened for KEEP_LAST like any other, on a backup
server without Ceph.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from drivers.tm.plan import (
    CONVERT_COROUTINES,
    RBD_SNAPSHOT_PREFIX,
    parse_chain_snapshot,
    rbd_snapshot_name,
)
from drivers.vmm.domainxml import Disk
from scheduler.errors import ValidationError

SNAPSHOT_PREFIX = RBD_SNAPSHOT_PREFIX
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}\Z")
_SNAPSHOT = re.compile(rf"{SNAPSHOT_PREFIX}([A-Za-z0-9][A-Za-z0-9_-]{{0,63}})\Z")
_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}\Z")
TIMED_OUT = 110  # rbd's exit status when a client timeout expired (ETIMEDOUT)


@dataclass(frozen=True)
class RbdTimeouts:
    """Seconds a client waits: to reach a mon at all, for a mon's answer, for an OSD's answer."""

    mount: float = 15.0
    mon_op: float = 15.0
    osd_op: float = 60.0

    def options(self) -> list[tuple[str, str]]:
        return [("client_mount_timeout", f"{self.mount:g}"), ("rados_mon_op_timeout", f"{self.mon_op:g}"),
                ("rados_osd_op_timeout", f"{self.osd_op:g}")]


@dataclass(frozen=True)
class RbdAccess:
    """How a hypervisor reaches a cluster (OpenNebula's CEPH_USER, CEPH_KEY, CEPH_CONF, CEPH_HOST); an empty
    value leaves Ceph's own default (``/etc/ceph/ceph.conf``, its keyring, its mon host)."""

    user: str = ""
    key_file: str = ""
    conf: str = ""
    mon_hosts: tuple[str, ...] = ()  # host or host:port, as libvirt's <host> elements give them


@dataclass(frozen=True)
class RbdSource:
    """One RBD disk to back up: OpenNebula's DISK_ID, the libvirt target, ``pool/image`` and the access."""

    disk_id: int
    target: str
    pool: str
    image: str
    access: RbdAccess = RbdAccess()

    @property
    def spec(self) -> str:
        return f"{self.pool}/{self.image}"


# ------------------------------------------------------------------------------------------------ names


def check_name(value: str, what: str) -> str:
    """A pool, namespace or image name safe in an argv and in an ``rbd:`` file name."""
    if not _NAME.match(value or ""):
        raise ValidationError(f"{what} {value!r} is not a plain RBD name (letters, digits, '_', '.', '+', '-'; "
                              "no leading '-' or '.')")
    return value


def check_image(image: str) -> str:
    """An image name, with an optional ``namespace/`` in front (libvirt's ``pool/namespace/image``)."""
    parts = image.split("/")
    if len(parts) > 2:
        raise ValidationError(f"RBD image {image!r} has more than a namespace and a name")
    for part in parts:
        check_name(part, "RBD image")
    return image


CEPH_KEYS = ("CEPH_USER", "CEPH_KEY", "CEPH_CONF", "CEPH_HOST")


def access_from(values: Mapping[str, str]) -> RbdAccess:
    """The access OpenNebula's CEPH_USER, CEPH_KEY, CEPH_CONF and CEPH_HOST (hosts split at ',' or blanks) name."""
    def value(key: str) -> str:
        return (values.get(key) or "").strip()

    return RbdAccess(value("CEPH_USER"), value("CEPH_KEY"), value("CEPH_CONF"),
                     tuple(value("CEPH_HOST").replace(",", " ").split()))


def check_access(access: RbdAccess) -> RbdAccess:
    if access.user and not _USER.match(access.user):
        raise ValidationError(f"CEPH_USER {access.user!r} is not a plain cephx id")
    for what, path in (("CEPH_KEY", access.key_file), ("CEPH_CONF", access.conf)):
        if path and (not path.startswith("/") or any(c in path for c in ":;\n\0")):
            raise ValidationError(f"{what} {path!r} must be an absolute path without ':' or ';'")
    for host in access.mon_hosts:
        if not re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:]+\](:[0-9]{1,5})?", host):
            raise ValidationError(f"CEPH_HOST entry {host!r} is not a host or host:port")
    return access


snapshot_name = rbd_snapshot_name  # ``vmsched-<run>``


def snapshot_run(name: str) -> str | None:
    """The run a snapshot named like vmsched's belongs to; None for any other snapshot (never touched)."""
    found = _SNAPSHOT.match(name)
    return found.group(1) if found else None


def rbd_source(disk: Disk, disk_id: int, access: RbdAccess | None = None) -> RbdSource:
    """The RBD source of a domain's ``<disk type='network'><source protocol='rbd'>``: pool and image from its
    name, the mon hosts and cephx user from the disk itself unless ``access`` names them."""
    if disk.type != "network" or disk.protocol != "rbd" or not disk.pool or not disk.image:
        raise ValidationError(f"disk {disk_id} ({disk.target}) is not an RBD network disk")
    given = access or RbdAccess()
    hosts = given.mon_hosts or tuple(h.name if h.port is None else f"{h.name}:{h.port}" for h in disk.hosts)
    merged = RbdAccess(user=given.user or (disk.auth_username or ""), key_file=given.key_file, conf=given.conf,
                       mon_hosts=hosts)
    return RbdSource(disk_id, disk.target, check_name(disk.pool, "RBD pool"), check_image(disk.image),
                     check_access(merged))


# ------------------------------------------------------------------------------------------------ argv


def rbd_argv(access: RbdAccess, args: Sequence[str], timeouts: RbdTimeouts = RbdTimeouts()) -> list[str]:
    """``rbd`` with the access's user, key file, conf and mon hosts, and the client timeouts."""
    return _client_argv("rbd", access, args, timeouts)


def health_argv(access: RbdAccess, timeouts: RbdTimeouts = RbdTimeouts()) -> list[str]:
    """``ceph health`` as the access's user: the cluster reached (a mon answers) and how it is; ``--connect-timeout``
    bounds the whole call."""
    return _ceph_argv(access, ["health"], timeouts)


def df_argv(access: RbdAccess, timeouts: RbdTimeouts = RbdTimeouts()) -> list[str]:
    """``ceph df`` as the access's user: each pool's stored bytes and what it may still take (needs a mgr)."""
    return _ceph_argv(access, ["df", "--format", "json"], timeouts)


def _ceph_argv(access: RbdAccess, args: Sequence[str], timeouts: RbdTimeouts) -> list[str]:
    """``ceph`` as the access's user, ``--connect-timeout`` bounding the whole call."""
    return _client_argv("ceph", access, ["--connect-timeout", f"{timeouts.mount:g}", *args], timeouts)


def parse_pool_space(output: str | bytes, pool: str) -> tuple[int, int]:
    """(stored bytes, bytes it may still take: ``max_avail``) of ``pool`` in ``ceph df --format json``."""
    try:
        pools = json.loads(output)["pools"]
        stats = next((p["stats"] for p in pools if p.get("name") == pool), None)
        if stats is None:
            raise ValidationError(f"the cluster has no pool {pool!r} (its pools: "
                                  f"{', '.join(str(p.get('name')) for p in pools) or 'none'})")
        return int(stats["stored"]), int(stats["max_avail"])
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ValidationError(f"cannot read the space of pool {pool!r} in ceph df output: {output[-200:]!r}") from None


def _client_argv(tool: str, access: RbdAccess, args: Sequence[str], timeouts: RbdTimeouts) -> list[str]:
    argv = [tool]
    if access.user:
        argv += ["--id", access.user]
    if access.key_file:
        argv += ["--keyfile", access.key_file]
    if access.conf:
        argv += ["--conf", access.conf]
    if access.mon_hosts:
        argv += ["--mon-host", ",".join(access.mon_hosts)]
    for name, value in timeouts.options():
        argv += [f"--{name.replace('_', '-')}", value]
    return [*argv, *args]


def snap_create_argv(source: RbdSource, snapshot: str, timeouts: RbdTimeouts = RbdTimeouts()) -> list[str]:
    return rbd_argv(source.access, ["snap", "create", "--no-progress", f"{source.spec}@{snapshot}"], timeouts)


def snap_remove_argv(source: RbdSource, snapshot: str, timeouts: RbdTimeouts = RbdTimeouts()) -> list[str]:
    if snapshot_run(snapshot) is None and parse_chain_snapshot(snapshot) is None:
        raise ValidationError(f"snapshot {snapshot!r} of {source.spec} is not vmsched's: it is never removed")
    return rbd_argv(source.access, ["snap", "rm", "--no-progress", f"{source.spec}@{snapshot}"], timeouts)


def snap_list_argv(source: RbdSource, timeouts: RbdTimeouts = RbdTimeouts()) -> list[str]:
    return rbd_argv(source.access, ["snap", "ls", "--format", "json", source.spec], timeouts)


def diff_argv(source: RbdSource, since: str, snapshot: str, timeouts: RbdTimeouts = RbdTimeouts()) -> list[str]:
    """The extents that changed between snapshots ``since`` and ``snapshot`` (no data read)."""
    return rbd_argv(source.access, ["diff", "--format", "json", "--from-snap", since, f"{source.spec}@{snapshot}"],
                    timeouts)


def info_argv(source: RbdSource, timeouts: RbdTimeouts = RbdTimeouts()) -> list[str]:
    return rbd_argv(source.access, ["info", "--format", "json", source.spec], timeouts)


def du_argv(source: RbdSource, snapshot: str | None, timeouts: RbdTimeouts = RbdTimeouts()) -> list[str]:
    """The space the image (at ``snapshot``) takes: quick with fast-diff, Ceph's default."""
    return rbd_argv(source.access, ["du", "--format", "json",
                                    source.spec + (f"@{snapshot}" if snapshot else "")], timeouts)


def parse_used(output: str | bytes, snapshot: str | None) -> int:
    """``used_size`` of the image (at ``snapshot``) in ``rbd du --format json``: what a full copy reads at most."""
    try:
        images = json.loads(output)["images"]
        found = [i for i in images if (i.get("snapshot") or None) == snapshot]
        return int((found or images)[-1]["used_size"])
    except (ValueError, KeyError, TypeError, IndexError):
        raise ValidationError(f"cannot read the used size in rbd du output: {output[-200:]!r}") from None


def parse_size(output: str | bytes) -> int:
    """The image size in bytes of ``rbd info --format json``."""
    try:
        return int(json.loads(output)["size"])
    except (ValueError, KeyError, TypeError):
        raise ValidationError(f"cannot read the size in rbd info output: {output[-200:]!r}") from None


def parse_diff(output: str | bytes) -> list[tuple[int, int]]:
    """(offset, length) of each changed extent in ``rbd diff --format json`` (written or discarded: either way
    the link must hold what the snapshot reads there), adjacent ones joined. Ceph reports an object that grew
    since the older snapshot from its old end on (the gap reads as zeros, and is copied as such)."""
    try:
        listed = json.loads(output or "[]")
        ranges = sorted((int(e["offset"]), int(e["length"])) for e in listed)
    except (ValueError, KeyError, TypeError):
        raise ValidationError(f"cannot read rbd diff output: {output[-200:]!r}") from None
    joined: list[tuple[int, int]] = []
    for start, length in ranges:
        if joined and joined[-1][0] + joined[-1][1] >= start:
            end = max(joined[-1][0] + joined[-1][1], start + length)
            joined[-1] = (joined[-1][0], end - joined[-1][0])
        elif length > 0:
            joined.append((start, length))
    return joined


CLUSTER_SIZES = (65536, 32768, 16384, 8192, 4096)


def link_bytes(extents: Sequence[tuple[int, int]], cluster: int) -> int:
    """About what a qcow2 link with ``cluster``-byte clusters holding ``extents`` stores: every cluster an extent
    touches, and one L2 table (one cluster, mapping ``cluster / 8`` clusters) per span it touches."""
    clusters: set[int] = set()
    for start, length in extents:
        clusters.update(range(start // cluster, (start + length - 1) // cluster + 1))
    tables = {c // (cluster // 8) for c in clusters}
    return (len(clusters) + len(tables)) * cluster


CLUSTER_SLACK = 1.05  # a larger cluster (less metadata, faster reads) is kept unless a smaller saves more


def link_cluster_size(extents: Sequence[tuple[int, int]]) -> int:
    """The largest cluster size that stores ``extents`` within 5 % of the fewest bytes: large extents keep qemu's
    64 KiB default, scattered small writes get small clusters instead of a 64 KiB one each."""
    least = min(link_bytes(extents, c) for c in CLUSTER_SIZES)
    return next(c for c in CLUSTER_SIZES if link_bytes(extents, c) <= CLUSTER_SLACK * least)


def link_create_argv(source: RbdSource, snapshot: str, target: str, size: int, cluster: int,
                     timeouts: RbdTimeouts = RbdTimeouts()) -> list[str]:
    """An empty qcow2 ``target`` backed by the image at ``snapshot``, which copy-on-read reads fill with the
    changed extents (the backing is then pointed at the previous link by name)."""
    return ["qemu-img", "create", "-q", "-u", "-f", "qcow2", "-F", "raw", "-o", f"cluster_size={int(cluster)}",
            "-b", qemu_rbd_name(source, snapshot, timeouts), target, str(int(size))]


def parse_snapshots(output: str | bytes) -> list[str]:
    """The snapshot names of ``rbd snap ls --format json``."""
    try:
        listed = json.loads(output or "[]")
    except ValueError:
        raise ValidationError(f"cannot read rbd snap ls output: {output[-200:]!r}") from None
    if not isinstance(listed, list):
        raise ValidationError("rbd snap ls printed no list")
    return [str(entry.get("name")) for entry in listed if isinstance(entry, dict)]


def _escaped(value: str) -> str:
    """A value of an ``rbd:`` file name: qemu splits at ':' and '@' unless a backslash comes first."""
    return re.sub(r"([\\:@=])", r"\\\1", value)


def qemu_rbd_name(source: RbdSource, snapshot: str | None = None, timeouts: RbdTimeouts = RbdTimeouts()) -> str:
    """qemu's ``rbd:pool/image[@snap]:key=value...`` for the source (user, conf, keyring, mon hosts, the client
    timeouts); every value escaped."""
    access = source.access
    name = f"rbd:{source.spec}" + (f"@{snapshot}" if snapshot else "")
    options: list[tuple[str, str]] = []
    if access.user:
        options.append(("id", access.user))
    if access.conf:
        options.append(("conf", access.conf))
    if access.key_file:
        options.append(("keyfile", access.key_file))
    if access.mon_hosts:
        options.append(("mon_host", ";".join(access.mon_hosts)))
    options += timeouts.options()
    return name + "".join(f":{key}={_escaped(value)}" for key, value in options)


def convert_argv(source: RbdSource, snapshot: str | None, target: str, *, rate_limit: int = 0,
                 timeouts: RbdTimeouts = RbdTimeouts()) -> list[str]:
    """``qemu-img convert`` of the image (at ``snapshot``; None: the image itself, for a powered-off VM)
    straight from the cluster into a sparse qcow2: no raw copy is staged."""
    argv = ["qemu-img", "convert", "-q", "-m", str(CONVERT_COROUTINES), "-f", "raw", "-O", "qcow2"]
    if rate_limit:
        argv += ["-r", str(rate_limit)]
    return [*argv, qemu_rbd_name(source, snapshot, timeouts), target]


# ------------------------------------------------------------------------------------------------ journal


def source_fields(source: RbdSource) -> dict[str, Any]:
    """What a journal step keeps of a source (plain JSON), enough to remove its snapshot after a crash."""
    a = source.access
    return {"disk_id": source.disk_id, "target": source.target, "pool": source.pool, "image": source.image,
            "user": a.user, "key_file": a.key_file, "conf": a.conf, "mon_hosts": list(a.mon_hosts)}


def source_from_fields(fields: Mapping[str, Any]) -> RbdSource:
    """The source a journal step names, checked again as when it was captured (ValidationError otherwise)."""
    access = RbdAccess(str(fields.get("user") or ""), str(fields.get("key_file") or ""), str(fields.get("conf") or ""),
                       tuple(str(h) for h in fields.get("mon_hosts") or ()))
    return RbdSource(int(fields.get("disk_id", -1)), str(fields.get("target", "")),
                     check_name(str(fields.get("pool", "")), "RBD pool"), check_image(str(fields.get("image", ""))),
                     check_access(access))
