"""MODE=INCREMENT chains across a VM restart, a libvirtd restart and a live migration, through a real daemon.

"A VM restart, a host daemon restart or a live migration between hosts sharing the disk must not cost a
full: the bitmaps are persistent." Each case takes base 0 and increment 1 of a running tiny TCG domain
(qcow2 vda and vdb) into an fs datastore, then restarts or moves something, writes 1 MiB into vda and
512 KiB into vdb, copies both disks (``qemu-img convert``) and backs up. That backup must be increment 2 of
the same chain image: the VM's pointers at (image, 2), links 0, 1, 2 and no new image; the link on the
datastore holds what was written (under 2 MiB allocated per disk file, where a full copy would hold the
9 MiB and 4.5 MiB of data the disks have by then);
``one.image.restore`` at increment 2 gives back exactly the copies; and the domain then has vmsched's
last two checkpoints (1 and 2) in libvirt and as dirty bitmaps in every disk, read from QEMU.

* VM restart: there is no guest OS to shut down (``virsh shutdown`` is ignored), so the domain is
  destroyed with ``VIR_DOMAIN_DESTROY_GRACEFUL``: libvirt sends QEMU SIGTERM and nothing stronger, which is
  also how libvirt ends QEMU after a guest powers itself off (``on_poweroff=destroy``). QEMU then closes
  its images in order and writes the persistent bitmaps into them: the test reads them from the stopped
  qcow2 files before starting the domain again (a new QEMU). A QEMU killed with SIGKILL (a host crash)
  stores nothing: the bitmaps it made never reach the files and the next backup is a new full, which
  the second test shows, so that the first one could fail.
* libvirtd restart: it is done in a private one-host environment (``tests.realenv`` ``up`` in the test's
  own directory, purged afterwards), not on the session's host1, which other tests (and other developers'
  sessions) share: their libvirt connections would break and the session's recorded PIDs would go stale.
  libvirtd is stopped by its recorded PID while the domain runs (QEMU survives it) and ``up`` starts it
  again; the daemon's libvirt connection to that host breaks with it.
* live migration host1 -> host2: ``virDomainMigrate3`` (managed, direct: the test's two connections)
  over a tcp migration stream on 127.0.0.1, LIVE | PERSIST_DEST | UNDEFINE_SOURCE. The disks stay where
  they are (both hosts see the same files); libvirt only knows shared storage by file system type, so
  without VIR_MIGRATE_UNSAFE it refuses with "Unsafe migration: Migration without shared storage is
  unsafe". The bitmaps arrive with the guest (host2's QEMU has them, read before the backup); libvirt
  does not move checkpoint metadata, so the daemon must redefine checkpoint 1 on host2 from its sound
  bitmaps, and follow the domain there (HISTORY, the hosts' VMS) when the backup locates it.

After the migration, bitmap 0 (whose checkpoint libvirt on host2 never knew) must go with the next increment
like any bitmap no checkpoint names. And before any action, the daemon's monitoring follows the migrated, running VM to
host2.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
import pytest

from tests import test_increments_real
from tests.realenv import model, procs
from tests.realenv import realenv as renv
from tests.realenv.domains import Hypervisor, TinyDomain
from tests.realenv.model import ProcRef, RealEnv
from tests.test_backup_real import same_image, snapshot_copy
from tests.test_import_real import Api, real_daemon, staged_state
from tests.test_increments_faults_real import bitmaps
from tests.test_increments_real import INCREMENT, Chains, incremental_vm, increments, wait_state

pytestmark = pytest.mark.realenv
chains = test_increments_real.chains  # that module's daemon and datastores fixture, one instance here too
MiB = 1 << 20
RUNNING, POWEROFF = "3", "8"
MIGRATE_FLAGS = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
                 | libvirt.VIR_MIGRATE_UNSAFE)


# ---- the chain ---------------------------------------------------------------------------------------------


def image_ids(chains: Chains, vm_id: int) -> list[int]:
    return [int(i.text or "") for i in chains.api.vm(vm_id).iterfind("BACKUPS/BACKUP_IDS/ID")]


def two_links(chains: Chains, hv: Hypervisor, dom: TinyDomain, vm_id: int) -> int:
    """Base 0 and increment 1 of the VM's chain in the fs datastore; the chain image. The disks then hold
    9 MiB (vda) and 4.5 MiB (vdb) of data: a full copy of them could not pass for an increment."""
    for n, what in enumerate(["live full base of a new chain", "live increment 1"]):
        hv.write_pattern(dom, "vda", pattern=0x21 + n, offset=f"{12 * n}M", length="8M" if n == 0 else "1M")
        hv.write_pattern(dom, "vdb", pattern=0x31 + n, offset=f"{5 * n}M", length="4M" if n == 0 else "512k")
        message = chains.backup(vm_id, "fs")
        assert message.startswith(what), message
    [image_id] = image_ids(chains, vm_id)
    assert chains.pointers(vm_id) == (image_id, 1)
    assert hv.checkpoints(dom) == [f"vmsched-{vm_id}-0", f"vmsched-{vm_id}-1"]
    return image_id


def write_and_copy(hv: Hypervisor, dom: TinyDomain, into: Path) -> tuple[Path, Path]:
    """1 MiB into vda and 512 KiB into vdb where nothing was written yet; copies of both disks then."""
    hv.write_pattern(dom, "vda", pattern=0x5A, offset="24M", length="1M")
    hv.write_pattern(dom, "vdb", pattern=0x5B, offset="9M", length="512k")
    return (snapshot_copy(dom.vda, into / "vda.at-2", "qcow2"), snapshot_copy(dom.vdb, into / "vdb.at-2", "qcow2"))


def restored_at(chains: Chains, image_id: int, increment: int, name: str) -> dict[int, Path]:
    """disk id -> the file ``one.image.restore`` makes of the chain at ``increment``."""
    reply = str(chains.api.call("one.image.restore", image_id, chains.images_ds,
                                f'INCREMENT_ID = "{increment}"\nNAME = "{name}"\nNO_IP = "YES"'))
    _, *made = map(int, reply.split())
    return {int((chains.image(i).findtext("TEMPLATE/RESTORED_FROM") or "").split(":")[1]):
            Path(chains.image(i).findtext("SOURCE") or "") for i in made}


def check_increment_2(chains: Chains, message: str, vm_id: int, image_id: int, at_2: tuple[Path, Path],
                      hv: Hypervisor, dom: TinyDomain, name: str, *, only_these_bitmaps: bool = True) -> None:
    """The backup just taken is increment 2 of chain ``image_id``, holding only what changed, restoring to
    ``at_2``; the domain (on ``hv``) has vmsched's checkpoints 1 and 2 and their bitmaps, sound, in every
    disk (and no other bitmap, unless ``only_these_bitmaps`` is false)."""
    assert message.startswith("live increment 2 "), message
    assert image_ids(chains, vm_id) == [image_id]  # no new chain image
    assert chains.pointers(vm_id) == (image_id, 2)
    image = chains.image(image_id)
    links = increments(image)
    assert [(i, t, p) for i, t, p, _, _ in links] == [(0, "FULL", -1), (1, "INCREMENT", 0), (2, "INCREMENT", 1)]
    assert image.find("TEMPLATE/NEW_CHAIN_REASON") is None
    assert links[2][4] <= 3  # MB recorded for the link (its files, rounded up)
    link = chains.bases["fs"] / str(vm_id) / links[2][3]
    for disk in (0, 1):  # what was written since increment 1 (1 MiB, 512 KiB) and qcow2's few metadata clusters
        assert (link / f"disk.{disk}.2").stat().st_blocks * 512 < 2 * MiB, f"disk {disk}"
    files = restored_at(chains, image_id, 2, name)
    assert same_image(files[0], at_2[0]), "vda at increment 2"
    assert same_image(files[1], at_2[1]), "vdb at increment 2"
    names = [f"vmsched-{vm_id}-1", f"vmsched-{vm_id}-2"]
    assert hv.checkpoints(dom) == names
    found = bitmaps(hv, dom)
    assert set(found) == {dom.vda.name, dom.vdb.name}, found
    for disk, names_there in found.items():
        assert (names_there == names) if only_these_bitmaps else set(names) <= set(names_there), (disk, names_there)


def stored_bitmaps(path: Path) -> dict[str, list[str]]:
    """Bitmap name -> its flags, as written in the (unused) qcow2 file."""
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(path)], capture_output=True,
                                     text=True, check=True, timeout=30).stdout)
    return {b["name"]: sorted(b["flags"]) for b in info["format-specific"]["data"].get("bitmaps", [])}


def qemu_of(host_state: Path, dom: TinyDomain) -> ProcRef:
    """The QEMU process running ``dom`` on the host whose state directory is ``host_state``."""
    return procs.ref_of("qemu", int((host_state / "run" / "qemu" / f"{dom.name}.pid").read_text()))


# ---- 1. VM restart ---------------------------------------------------------------------------------------


def test_a_vm_restarted_between_increments_continues_its_chain(
        chains: Chains, tiny_domain: Callable[..., TinyDomain], hypervisors: Callable[[str], Hypervisor],
        realenv: RealEnv, tmp_path: Path) -> None:
    host1 = hypervisors("host1")
    dom, vm_id = incremental_vm(chains, tiny_domain)
    image_id = two_links(chains, host1, dom, vm_id)
    state_dir = realenv.host("host1").state_dir
    first_qemu = qemu_of(state_dir, dom)

    host1.lookup(dom).destroyFlags(libvirt.VIR_DOMAIN_DESTROY_GRACEFUL)  # SIGTERM: QEMU ends in order
    wait_state(chains.api, vm_id, POWEROFF)
    assert not procs.is_running(first_qemu)
    for disk in (dom.vda, dom.vdb):  # both checkpoints' bitmaps were stored, usable (not "in-use")
        assert stored_bitmaps(disk) == {f"vmsched-{vm_id}-{n}": ["auto"] for n in (0, 1)}, disk.name
    host1.start(dom)
    wait_state(chains.api, vm_id, RUNNING)
    assert qemu_of(state_dir, dom) != first_qemu  # a new QEMU, which loaded the bitmaps from the images

    at_2 = write_and_copy(host1, dom, tmp_path)
    message = chains.backup(vm_id, "fs")
    check_increment_2(chains, message, vm_id, image_id, at_2, host1, dom, f"restarted-{vm_id}")


def test_a_vm_whose_qemu_was_killed_starts_a_new_chain(
        chains: Chains, tiny_domain: Callable[..., TinyDomain], hypervisors: Callable[[str], Hypervisor],
        realenv: RealEnv, tmp_path: Path) -> None:
    """The contrast: SIGKILL (a crash) gives QEMU no chance to store the bitmaps, so checkpoint 1 cannot be
    trusted (libvirt still lists it) and the next backup is a new full, with the reason."""
    host1 = hypervisors("host1")
    dom, vm_id = incremental_vm(chains, tiny_domain)
    first = two_links(chains, host1, dom, vm_id)
    qemu = qemu_of(realenv.host("host1").state_dir, dom)
    os.kill(qemu.pid, signal.SIGKILL)
    wait_state(chains.api, vm_id, POWEROFF)
    for disk in (dom.vda, dom.vdb):  # made while this QEMU ran, they were to reach the file when it closed
        assert stored_bitmaps(disk) == {}, disk.name
    host1.start(dom)
    wait_state(chains.api, vm_id, RUNNING)
    vda_now, _ = write_and_copy(host1, dom, tmp_path)

    message = chains.backup(vm_id, "fs")
    assert message.startswith("live full base of a new chain ("), message
    assert f"checkpoint vmsched-{vm_id}-1 of the previous increment" in message, message
    old, new = image_ids(chains, vm_id)
    assert old == first and chains.pointers(vm_id) == (new, 0)
    assert chains.image(new).findtext("TEMPLATE/NEW_CHAIN_CAUSE") == "checkpoint"
    assert [i[0] for i in increments(chains.image(first))] == [0, 1]  # the old chain is kept as it was
    assert same_image(restored_at(chains, new, 0, f"killed-{vm_id}")[0], vda_now)
    assert host1.checkpoints(dom) == [f"vmsched-{vm_id}-0"]


# ---- 2. libvirtd restart ------------------------------------------------------------------------------------


@pytest.fixture
def own_env(realenv: RealEnv, tmp_path: Path) -> Iterator[RealEnv]:
    """A private one-host environment (after the session's, which prepared the machine), purged afterwards."""
    directory = tmp_path / "own-env"
    try:
        yield renv.up(directory, hosts=1)
    finally:
        renv.purge(directory)


@pytest.fixture
def own_chains(own_env: RealEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chains]:
    """A daemon with the private environment's host1, an fs backup datastore and an image datastore."""
    state = staged_state(own_env, tmp_path_factory, f"/var/tmp/vmsched-restart-{secrets.token_hex(5)}")
    base, images = tmp_path_factory.mktemp("restart-fsds"), tmp_path_factory.mktemp("restart-images")
    for api in real_daemon(own_env, state):
        fs = int(api.call("one.datastore.allocate",  # type: ignore[call-overload]
                          f'NAME = "fsrestart"\nTYPE = "BACKUP_DS"\nDS_MAD = "fs"\nBASE_PATH = "{base}"', -1))
        images_ds = int(api.call("one.datastore.allocate",  # type: ignore[call-overload]
                                 f'NAME = "imgsrestart"\nTYPE = "IMAGE_DS"\nDS_MAD = "fs"\nBASE_PATH = "{images}"',
                                 -1))
        yield Chains(api, own_env, {"fs": fs}, {"fs": base}, images_ds)


def restart_libvirtd(env: RealEnv, host: str) -> tuple[ProcRef, ProcRef]:
    """Stop ``host``'s libvirtd by its recorded PID and let ``up`` start it again; (old, new)."""
    old = model.load(env.dir).host(host).proc("libvirtd")  # type: ignore[union-attr]
    assert old is not None and procs.stop([old]) == [old]
    new = renv.up(env.dir).host(host).proc("libvirtd")
    assert new is not None and procs.is_running(new) and new != old
    return old, new


def test_a_libvirtd_restart_between_increments_keeps_the_chain(
        own_env: RealEnv, own_chains: Chains, tmp_path: Path) -> None:
    host = own_env.host("host1")
    hv = Hypervisor(host)
    try:
        dom = hv.define(tmp_path / "domains", start=True, vdb_format="qcow2")
        vm_id = own_chains.api.import_one("host1", dom.name)
        own_chains.api.call("one.vm.updateconf", vm_id, INCREMENT, 1)
        image_id = two_links(own_chains, hv, dom, vm_id)
        qemu = qemu_of(host.state_dir, dom)
    finally:
        hv.close()

    lost = "host1: libvirt connection lost; reconnecting"
    assert lost not in own_chains.api.daemon.log()
    restart_libvirtd(own_env, "host1")
    assert procs.is_running(qemu)  # the guest ran on through the restart
    hv = Hypervisor(host)  # the old connection died with its libvirtd
    try:
        assert hv.state(dom) == "running" and qemu_of(host.state_dir, dom) == qemu
        assert hv.checkpoints(dom) == [f"vmsched-{vm_id}-0", f"vmsched-{vm_id}-1"]  # read back from disk
        at_2 = write_and_copy(hv, dom, tmp_path)
        message = own_chains.backup(vm_id, "fs")
        check_increment_2(own_chains, message, vm_id, image_id, at_2, hv, dom, f"libvirtd-{vm_id}")
        assert lost in own_chains.api.daemon.log()  # the daemon's connection had died with libvirtd
        assert own_chains.api.vm(vm_id).findtext("STATE") == RUNNING
    finally:
        hv.close()


# ---- 3. live migration --------------------------------------------------------------------------------------


def migrate(source: Hypervisor, target: Hypervisor, dom: TinyDomain) -> None:
    """Live-migrate ``dom`` (its disks stay where they are); returns once it runs on ``target``."""
    uuid = source.lookup(dom).UUIDString()
    moved = source.lookup(dom).migrate3(target.conn, {libvirt.VIR_MIGRATE_PARAM_URI: "tcp://127.0.0.1"},
                                        MIGRATE_FLAGS)
    assert moved.UUIDString() == uuid and target.state(dom) == "running"
    assert dom.name not in source.names()
    assert target.disk_sources(dom) == {"vda": dom.vda, "vdb": dom.vdb}  # the same files, not copies


def history_hosts(api: Api, vm_id: int) -> list[str]:
    return [h.findtext("HOSTNAME") or "" for h in api.vm(vm_id).iterfind("HISTORY_RECORDS/HISTORY")]


def host_vms(api: Api, name: str) -> set[int]:
    return {int(i.text or "") for i in api.host(name).iterfind("VMS/ID")}


def migrated_increment(chains: Chains, tiny_domain: Callable[..., TinyDomain],
                       hypervisors: Callable[[str], Hypervisor], realenv: RealEnv,
                       tmp_path: Path) -> tuple[TinyDomain, int, int, str, tuple[Path, Path]]:
    """Links 0 and 1 on host1, a live migration to host2, then the next backup there; (the domain, the VM,
    the chain image, the run's message, the disks copied before it). The caller removes the domain from host2."""
    host1, host2 = hypervisors("host1"), hypervisors("host2")
    dom, vm_id = incremental_vm(chains, tiny_domain)
    image_id = two_links(chains, host1, dom, vm_id)
    migrate(host1, host2, dom)
    qemu_of(realenv.host("host2").state_dir, dom)  # host2's QEMU runs it now
    assert host2.checkpoints(dom) == []  # libvirt did not move the checkpoints' records...
    assert bitmaps(host2, dom) == {p.name: [f"vmsched-{vm_id}-{n}" for n in (0, 1)]  # ...QEMU moved the bitmaps
                                   for p in (dom.vda, dom.vdb)}
    at_2 = write_and_copy(host2, dom, tmp_path)
    return dom, vm_id, image_id, chains.backup(vm_id, "fs"), at_2


def test_a_live_migration_to_a_host_sharing_the_disks_continues_the_chain_there(
        chains: Chains, tiny_domain: Callable[..., TinyDomain], hypervisors: Callable[[str], Hypervisor],
        realenv: RealEnv, tmp_path: Path) -> None:
    host2 = hypervisors("host2")
    try:
        dom, vm_id, image_id, message, at_2 = migrated_increment(chains, tiny_domain, hypervisors, realenv, tmp_path)
        check_increment_2(chains, message, vm_id, image_id, at_2, host2, dom, f"migrated-{vm_id}",
                          only_these_bitmaps=False)  # see the test after the next one
        assert f"libvirt had no record of checkpoint vmsched-{vm_id}-1, whose bitmaps are sound" in \
            chains.api.daemon.log()
        assert history_hosts(chains.api, vm_id)[-2:] == ["host1", "host2"]  # the backup followed the domain
        assert vm_id in host_vms(chains.api, "host2") and vm_id not in host_vms(chains.api, "host1")
        assert chains.api.vm(vm_id).findtext("STATE") == RUNNING
    finally:
        host2.remove(dom)


def test_after_a_migration_no_bitmap_outlives_the_chain_s_checkpoints(
        chains: Chains, tiny_domain: Callable[..., TinyDomain], hypervisors: Callable[[str], Hypervisor],
        realenv: RealEnv, tmp_path: Path) -> None:
    """As after any other increment 2, the disks carry exactly the bitmaps of checkpoints 1 and 2: QEMU
    updates every bitmap on every guest write, and the qcow2 keeps them."""
    host2 = hypervisors("host2")
    try:
        dom, vm_id, image_id, message, at_2 = migrated_increment(chains, tiny_domain, hypervisors, realenv, tmp_path)
        assert message.startswith("live increment 2 "), message
        names = [f"vmsched-{vm_id}-1", f"vmsched-{vm_id}-2"]
        assert host2.checkpoints(dom) == names
        assert bitmaps(host2, dom) == {dom.vda.name: names, dom.vdb.name: names}
    finally:
        host2.remove(dom)


@pytest.fixture
def watching(realenv: RealEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """A daemon with host1 and host2 whose monitoring rounds come every second."""
    state = staged_state(realenv, tmp_path_factory, f"/var/tmp/vmsched-migmon-{secrets.token_hex(5)}")
    with (state / "sched.conf").open("a") as conf:
        conf.write("MONITORING_INTERVAL_HOST = 1\n")
    yield from real_daemon(realenv, state)


def monitoring_rounds(api: Api, hosts: list[str], count: int) -> None:
    """Until each of ``hosts`` has been monitored ``count`` more times (its MONITORING/TIMESTAMP changed),
    which includes reading its domains' states."""
    def stamp(name: str) -> str:
        return api.host(name).findtext("MONITORING/TIMESTAMP") or ""

    seen = {name: [stamp(name)] for name in hosts}
    deadline = time.monotonic() + 30
    while any(len(stamps) <= count for stamps in seen.values()):
        assert time.monotonic() < deadline, (seen, api.daemon.log()[-3000:])
        for name, stamps in seen.items():
            if (now := stamp(name)) != stamps[-1]:
                stamps.append(now)
        time.sleep(0.1)


def test_monitoring_follows_a_domain_migrated_to_another_host(
        watching: Api, tiny_domain: Callable[..., TinyDomain], hypervisors: Callable[[str], Hypervisor]) -> None:
    """Before any action: vmsync's events and polls cover only the VMs bound to the host they come from, so
    the source's STOPPED/MIGRATED event makes the VM POWEROFF and no round of either host corrects it."""
    host1, host2 = hypervisors("host1"), hypervisors("host2")
    dom = tiny_domain("host1", vdb_format="qcow2")
    vm_id = watching.import_one("host1", dom.name)
    wait_state(watching, vm_id, RUNNING)
    try:
        migrate(host1, host2, dom)
        monitoring_rounds(watching, ["host1", "host2"], 2)
        vm = watching.vm(vm_id)
        assert (vm.findtext("STATE"), vm.findtext("LCM_STATE"), history_hosts(watching, vm_id)[-1]) == \
            (RUNNING, "3", "host2")
        assert vm_id in host_vms(watching, "host2") and vm_id not in host_vms(watching, "host1")
    finally:
        host2.remove(dom)
