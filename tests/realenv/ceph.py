"""A real single-node Ceph cluster for the RBD tests: one mon, one mgr (``ceph df`` needs it) and one OSD on
bluestore in a sparse file, with cephx, all on loopback, without systemd.

``up(DIR)`` is idempotent: a cluster whose recorded daemons all run and answer is kept; anything else is
stopped (by its recorded PIDs) and made again from nothing, in about five seconds. Every daemon's PID and
start time is recorded in ``DIR/ceph.json`` as soon as it runs; ``down(DIR)`` stops exactly those, one at a
time (OSD, mgr, mon), never by name. The hypervisors reach the cluster with a cephx user of their own,
``client.hypervisor`` (``profile rbd`` on the pool), never ``client.admin``.

Facts this follows (``../shared/reference/test-env-ceph.md``): Ceph 16 from Debian's packages; a short
paxos propose interval (else every map change waits a second); ``keyring = DIR/$name.keyring`` in the
conf so that every tool finds its key by ``--id``; a client mount timeout in the conf (the default hangs
for 300 s when the mon is gone); bluestore rather than memstore, which keeps every byte in the OSD's RAM.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import libvirt
import libvirt_qemu

from tests.realenv import procs, system
from tests.realenv.domains import Hypervisor, domain_xml, hmp_qemu_io, make_disks, new_name
from tests.realenv.errors import RealEnvError
from tests.realenv.model import ProcRef

log = logging.getLogger(__name__)

PACKAGES = ("ceph-mon", "ceph-osd", "ceph-mgr", "ceph-common", "qemu-block-extra")
STATE_FILE = "ceph.json"
POOL = "rbd"
CLIENT = "hypervisor"  # cephx id of the hypervisors' user
STORE_BYTES = 8 << 30  # the OSD's sparse bluestore file
COMMAND_TIMEOUT = 60.0
START_TIMEOUT = 60.0
LOOPBACK = "127.0.0.1"
DAEMONS = (("mon", "ceph-mon", "a"), ("mgr", "ceph-mgr", "x"), ("osd", "ceph-osd", "0"))


@dataclass(frozen=True)
class CephCluster:
    """A running cluster: its conf, the hypervisors' user and key, and the daemons it started."""

    dir: Path
    fsid: str
    mon_port: int  # msgr2
    mon_v1_port: int  # the legacy protocol, which QEMU's rbd driver speaks to the mon it is given
    pool: str = POOL
    client: str = CLIENT
    client_key: str = ""  # the user's cephx secret (base64), what libvirt's ceph secret holds
    procs: tuple[ProcRef, ...] = ()

    @property
    def conf(self) -> Path:
        return self.dir / "ceph.conf"

    @property
    def client_keyring(self) -> Path:
        return self.dir / f"client.{self.client}.keyring"

    @property
    def mon_addrs(self) -> str:
        return f"[v2:{LOOPBACK}:{self.mon_port},v1:{LOOPBACK}:{self.mon_v1_port}]"

    def argv(self, tool: str, *args: str, admin: bool = False) -> list[str]:
        """``tool`` (ceph, rbd, rados) against this cluster, as the hypervisors' user or as client.admin."""
        return [tool, "--conf", str(self.conf), "--id", "admin" if admin else self.client, *args]

    def run(self, tool: str, *args: str, admin: bool = False, timeout: float = COMMAND_TIMEOUT,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        return procs.run(self.argv(tool, *args, admin=admin), timeout=timeout, check=check, env=_env())


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("CEPH_ARGS", None)  # it would override --conf
    return env


def conf_text(directory: Path, fsid: str, mon_port: int, mon_v1_port: int) -> str:
    """The cluster's ceph.conf (pure). Both protocols, as a default cluster has them: libvirt hands QEMU the
    mon as ``host:port``, which librados reads as a legacy (v1) address."""
    d = directory
    return f"""\
[global]
fsid = {fsid}
mon host = [v2:{LOOPBACK}:{mon_port},v1:{LOOPBACK}:{mon_v1_port}]
public addr = {LOOPBACK}
cluster addr = {LOOPBACK}
ms bind msgr1 = true
ms bind msgr2 = true
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = {d}/$name.keyring
run dir = {d}/run
admin socket = {d}/run/$name.asok
pid file = {d}/run/$name.pid
log file = {d}/log/$name.log
mon data = {d}/mon/$name
mgr data = {d}/mgr/$name
osd data = {d}/osd/$name
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon warn on pool no redundancy = false
mon data avail crit = 1
mon data avail warn = 2
paxos propose interval = 0.05
client mount timeout = 15
osd objectstore = bluestore
bluestore block create = true
bluestore block size = {STORE_BYTES}
bluestore fsck on mkfs = false
bluestore fsck on mount = false
osd memory target = 939524096
osd op num shards = 1
"""


def _free_port(avoid: int = 0) -> int:
    while True:
        with socket.socket() as s:
            s.bind((LOOPBACK, 0))
            port = int(s.getsockname()[1])
        if port != avoid:
            return port


# ------------------------------------------------------------------------------------------------ state


def load(directory: Path) -> CephCluster | None:
    path = directory / STATE_FILE
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return CephCluster(dir=Path(data["dir"]), fsid=data["fsid"], mon_port=data["mon_port"],
                       mon_v1_port=data.get("mon_v1_port", 0), pool=data["pool"],
                       client=data["client"], client_key=data["client_key"],
                       procs=tuple(ProcRef(**p) for p in data["procs"]))


def save(cluster: CephCluster) -> None:
    data = {**asdict(cluster), "dir": str(cluster.dir)}
    path = cluster.dir / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def _healthy(cluster: CephCluster) -> bool:
    if len(cluster.procs) != len(DAEMONS) or not all(procs.is_running(p) for p in cluster.procs):
        return False
    return cluster.run("rbd", "ls", cluster.pool, timeout=20, check=False).returncode == 0


# ------------------------------------------------------------------------------------------------ up/down


def up(directory: Path) -> CephCluster:
    """The cluster in ``directory``: kept when it runs and answers, else made again from nothing."""
    directory = directory.absolute()
    previous = load(directory)
    if previous is not None and _healthy(previous):
        return previous
    if previous is not None:
        _stop(previous)
    installed = system.install_packages(PACKAGES)
    if installed:
        log.info("ceph: installed %s", " ".join(installed))
    started = time.monotonic()
    shutil.rmtree(directory, ignore_errors=True)
    for sub in ("run", "log", "mon/mon.a", "mgr/mgr.x", "osd/osd.0"):
        (directory / sub).mkdir(parents=True)
    v2 = _free_port()
    cluster = CephCluster(directory, str(uuid.uuid4()), v2, _free_port(avoid=v2))
    cluster.conf.write_text(conf_text(directory, cluster.fsid, cluster.mon_port, cluster.mon_v1_port))
    save(cluster)
    try:
        cluster = _make(cluster)
    except BaseException:
        _stop(load(directory) or cluster)
        raise
    log.info("ceph: cluster %s on %s ready in %.1f s", cluster.fsid, cluster.mon_addrs, time.monotonic() - started)
    return cluster


def _tool(*argv: str, input: str | None = None) -> str:
    return procs.run(list(argv), timeout=COMMAND_TIMEOUT, env=_env(), input=input).stdout


def _admin(cluster: CephCluster, *args: str, input: str | None = None) -> str:
    return procs.run(cluster.argv("ceph", *args, admin=True), timeout=COMMAND_TIMEOUT, env=_env(),
                     input=input).stdout


def _start(cluster: CephCluster, role: str, binary: str, daemon_id: str) -> CephCluster:
    """Start one daemon (it forks into the background and writes its pid file) and record it at once."""
    pidfile = cluster.dir / "run" / f"{role}.{daemon_id}.pid"
    pidfile.unlink(missing_ok=True)
    procs.run([binary, "--conf", str(cluster.conf), "-i", daemon_id], timeout=COMMAND_TIMEOUT, env=_env())
    cluster = replace(cluster, procs=(*cluster.procs, procs.ref_from_pidfile(role, pidfile)))
    save(cluster)
    return cluster


def _make(cluster: CephCluster) -> CephCluster:
    d, conf = cluster.dir, str(cluster.conf)
    mon_keyring, admin_keyring = d / "mon.a.keyring", d / "client.admin.keyring"
    _tool("ceph-authtool", "--create-keyring", str(mon_keyring), "--gen-key", "-n", "mon.",
          "--cap", "mon", "allow *")
    _tool("ceph-authtool", "--create-keyring", str(admin_keyring), "--gen-key", "-n", "client.admin",
          "--cap", "mon", "allow *", "--cap", "osd", "allow *", "--cap", "mgr", "allow *", "--cap", "mds", "allow *")
    _tool("ceph-authtool", str(mon_keyring), "--import-keyring", str(admin_keyring))
    _tool("monmaptool", "--create", "--fsid", cluster.fsid, "--addv", "a", cluster.mon_addrs, str(d / "monmap"))
    _tool("ceph-mon", "--conf", conf, "--mkfs", "-i", "a", "--monmap", str(d / "monmap"),
          "--keyring", str(mon_keyring))
    cluster = _start(cluster, "mon", "ceph-mon", "a")
    _admin(cluster, "auth", "get-or-create", "mgr.x", "mon", "allow profile mgr", "osd", "allow *", "mds", "allow *",
           "-o", str(d / "mgr.x.keyring"))
    cluster = _start(cluster, "mgr", "ceph-mgr", "x")
    key = _tool("ceph-authtool", "--gen-print-key").strip()
    osd_uuid = str(uuid.uuid4())
    osd_id = _admin(cluster, "osd", "new", osd_uuid, "-i", "-", input=json.dumps({"cephx_secret": key})).strip()
    if osd_id != "0":
        raise RealEnvError(f"ceph: the new OSD got id {osd_id!r}, not 0")
    (d / "osd.0.keyring").write_text(f"[osd.0]\n\tkey = {key}\n")
    _tool("ceph-osd", "--conf", conf, "-i", "0", "--mkfs", "--osd-uuid", osd_uuid)
    cluster = _start(cluster, "osd", "ceph-osd", "0")
    procs.wait_until(lambda: _osd_up(cluster), START_TIMEOUT, "ceph: osd.0 up")
    _admin(cluster, "osd", "pool", "create", cluster.pool, "8", "8", "replicated")
    procs.run(cluster.argv("rbd", "pool", "init", cluster.pool, admin=True), timeout=COMMAND_TIMEOUT, env=_env())
    _admin(cluster, "auth", "get-or-create", f"client.{cluster.client}", "mon", "profile rbd", "osd",
           f"profile rbd pool={cluster.pool}", "mgr", f"profile rbd pool={cluster.pool}",
           "-o", str(cluster.client_keyring))
    cluster = replace(cluster, client_key=_admin(cluster, "auth", "get-key", f"client.{cluster.client}").strip())
    save(cluster)
    procs.wait_until(lambda: cluster.run("rbd", "ls", cluster.pool, timeout=20, check=False).returncode == 0,
                     START_TIMEOUT, "ceph: the pool to answer", interval=0.1)
    procs.wait_until(lambda: _mgr_available(cluster), START_TIMEOUT, "ceph: the mgr to be available", interval=0.1)
    return cluster


def _osd_up(cluster: CephCluster) -> bool:
    out = procs.run(cluster.argv("ceph", "osd", "dump", "-f", "json", admin=True), timeout=20, check=False,
                    env=_env())
    return out.returncode == 0 and any(o.get("up") == 1 for o in json.loads(out.stdout or "{}").get("osds", []))


def _mgr_available(cluster: CephCluster) -> bool:
    out = procs.run(cluster.argv("ceph", "mgr", "stat", "-f", "json", admin=True), timeout=20, check=False,
                    env=_env())
    return out.returncode == 0 and bool(json.loads(out.stdout or "{}").get("available"))


def _stop(cluster: CephCluster) -> list[ProcRef]:
    """The recorded daemons stopped one at a time, OSD first (a TERMed OSD waits for the mon's ack)."""
    stopped = []
    for role in ("osd", "mgr", "mon"):
        stopped += procs.stop([p for p in cluster.procs if p.role == role], timeout=10)
    save(replace(cluster, procs=()))
    return stopped


def down(directory: Path) -> list[ProcRef]:
    """Stop exactly the daemons recorded in ``directory`` (nothing when there is no cluster)."""
    cluster = load(directory.absolute()) if directory.exists() else None
    return _stop(cluster) if cluster is not None else []


# ------------------------------------------------------------------------------------------------ libvirt


def secret_xml(secret_uuid: str, usage: str) -> str:
    """A libvirt ``ceph`` secret (its value, the cephx key, is set apart) (pure)."""
    return (f"<secret ephemeral='no' private='yes'><uuid>{secret_uuid}</uuid>"
            f"<usage type='ceph'><name>{escape(usage)}</name></usage></secret>")


def rbd_disk_xml(cluster: CephCluster, image: str, target: str, secret_uuid: str) -> str:
    """A ``<disk type='network'>`` of RBD image ``pool/image`` as the hypervisors' user (pure)."""
    return (f"<disk type='network' device='disk'><driver name='qemu' type='raw' cache='none'/>"
            f"<auth username={quoteattr(cluster.client)}><secret type='ceph' uuid='{secret_uuid}'/></auth>"
            f"<source protocol='rbd' name={quoteattr(f'{cluster.pool}/{image}')}>"
            f"<host name='{LOOPBACK}' port='{cluster.mon_v1_port}'/></source>"
            f"<target dev={quoteattr(target)} bus='virtio'/></disk>")


@dataclass
class RbdDomain:
    """A running tiny domain whose ``vdc`` is RBD image ``image`` (qcow2 ``vda`` and ``vdb`` beside it)."""

    dom: libvirt.virDomain
    image: str
    vda: Path

    @property
    def name(self) -> str:
        return str(self.dom.name())


@contextmanager
def rbd_domain(cluster: CephCluster, hypervisor: Hypervisor, directory: Path, size: str = "32M") -> Iterator[RbdDomain]:
    """A running TCG domain on ``hypervisor``: qcow2 vda and vdb in ``directory``, vdc on a new RBD image of
    ``size`` reached as the hypervisors' user through a libvirt ceph secret; all of it removed afterwards."""
    image, secret_uuid, name = f"t-{uuid.uuid4().hex[:8]}", str(uuid.uuid4()), new_name()
    cluster.run("rbd", "create", "--size", size, f"{cluster.pool}/{image}")
    secret = hypervisor.conn.secretDefineXML(secret_xml(secret_uuid, f"client.{cluster.client} {name}"))
    dom = None
    try:
        secret.setValue(base64.b64decode(cluster.client_key))  # the key's bytes (secret-set-value --base64 KEY)
        vda, vdb, _ = make_disks(directory, vdb_format="qcow2")
        xml = domain_xml(name, vda, vdb, vdb_format="qcow2").replace(
            "    <controller", "    " + rbd_disk_xml(cluster, image, "vdc", secret_uuid) + "\n    <controller", 1)
        dom = hypervisor.conn.defineXML(xml)
        dom.create()
        yield RbdDomain(dom, image, vda)
    finally:
        if dom is not None:
            if dom.isActive():
                dom.destroy()
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                              | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
        secret.undefine()
        cluster.run("rbd", "snap", "purge", "--no-progress", f"{cluster.pool}/{image}", check=False)
        cluster.run("rbd", "rm", "--no-progress", f"{cluster.pool}/{image}", check=False)


def guest_write(dom: libvirt.virDomain, disk: str, pattern: int, offset: str, length: str) -> None:
    """Write ``pattern`` into the running guest's ``disk`` as the guest would (qemu-io on its backend), then flush."""
    for command in (f"write -P {pattern:#x} {offset} {length}", "flush"):
        out = libvirt_qemu.qemuMonitorCommand(dom, hmp_qemu_io(disk, command),
                                              libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
        if "error" in out.lower():
            raise RealEnvError(f"qemu-io {command!r} on {disk}: {out}")
