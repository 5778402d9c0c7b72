"""The pure parts of a backup run (checks, disk choice, the image record) and, against the real
environment, the recovery of a run the daemon died in."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from zoneinfo import ZoneInfo

import asyncssh
import pytest

from drivers import hostkeys
from drivers.datastore import Capacity, UploadResult
from drivers.local import LocalRunner
from drivers.ssh import SshSettings, SshTarget
from drivers.tm import DiskSource
from drivers.tm.rbdplan import RbdAccess, RbdSource
from drivers.vmm.domainxml import Disk, NetworkHost
from scheduler.backup import checks as bc
from scheduler.backup import recovery as brec
from scheduler.backup import steps as bsteps
from scheduler.backup import transport as btr
from scheduler.engine.journal import Run
from scheduler.errors import ActionError, ValidationError
from scheduler.hosts.links import HostLinks
from scheduler.model.objects.common import Ownership
from scheduler.model.objects.datastore import Datastore
from scheduler.model.objects.host import Host
from scheduler.model.objects.image import Image
from scheduler.model.objects.states import DatastoreType, ImageType, LcmState, VmState
from scheduler.model.objects.vm import History, Vm
from scheduler.model.template import Template, Vector
from scheduler.restore import to_images
from scheduler.store.codecs import build_codecs
from scheduler.store.sqlite import Store
from scheduler.store.state import State
from tests.realenv.model import RealEnv

UTC = ZoneInfo("UTC")


def disk(disk_id: int, target: str, kind: str = "FILE", size: str = "64") -> Vector:
    return Vector([("DISK_ID", str(disk_id)), ("TARGET", target), ("TYPE", kind), ("SIZE", size)])


def vm(state: VmState = VmState.ACTIVE, lcm: LcmState = LcmState.RUNNING, *, bound: bool = True,
       disks: tuple[Vector, ...] = (), config: dict[str, str] | None = None) -> Vm:
    template = Template()
    for d in disks:
        template.add("DISK", d)
    history = [History(seq=0, hostname="host1", hid=0, stime=1)] if bound else []
    return Vm(id=7, name="db", state=state, lcm_state=lcm, template=template, history=history,
              backup_config=Vector(list((config or {}).items())), ownership=Ownership(5, 1, "alice", "users"))


@pytest.mark.parametrize(("state", "lcm", "expected"), [
    (VmState.ACTIVE, LcmState.RUNNING, LcmState.BACKUP),
    (VmState.POWEROFF, LcmState.LCM_INIT, LcmState.BACKUP_POWEROFF),
    (VmState.ACTIVE, LcmState.BACKUP, "wrong state BACKUP."),
    (VmState.SUSPENDED, LcmState.LCM_INIT, "wrong state SUSPENDED."),
    (VmState.ACTIVE, LcmState.HOTPLUG, "wrong state HOTPLUG."),
])
def test_backup_state(state: VmState, lcm: LcmState, expected: LcmState | str) -> None:
    if isinstance(expected, LcmState):
        assert bc.backup_state(vm(state, lcm)) is expected
    else:
        with pytest.raises(ActionError, match="Could not create a new backup for VM 7, " + expected):
            bc.backup_state(vm(state, lcm))


def test_unbound_vm_is_refused_before_its_state_is_looked_at() -> None:
    with pytest.raises(ActionError, match="VM 7 is not bound to a host"):
        bc.backup_state(vm(VmState.PENDING, bound=False))


@pytest.mark.parametrize(("disks", "config", "expected"), [
    ((disk(0, "vda"), disk(1, "vdb", "CDROM"), disk(2, "vdc", "SWAP")), {}, [0]),
    ((disk(0, "vda"), disk(3, "vdd", "FS")), {}, [0]),
    ((disk(0, "vda"), disk(3, "vdd", "FS")), {"BACKUP_VOLATILE": "YES"}, [0, 3]),
    ((disk(1, "hdc", "CDROM"),), {}, None),
])
def test_selected_disks(disks: tuple[Vector, ...], config: dict[str, str], expected: list[int] | None) -> None:
    if expected is None:
        with pytest.raises(ActionError, match="VM 7 has no disk to back up"):
            bc.selected_disks(vm(disks=disks, config=config))
    else:
        assert [int(d["DISK_ID"]) for d in bc.selected_disks(vm(disks=disks, config=config))] == expected


def test_reservation_is_the_sum_of_the_disk_sizes() -> None:
    assert bc.reservation_mb([disk(0, "vda", size="64"), disk(1, "vdb", size="32"), disk(2, "vdc", size="")]) == 96


@pytest.mark.parametrize(("attribute", "default", "expected"), [
    ("", True, True), ("", False, False), ("NO", True, False), ("yes", False, True), ("maybe", False, False),
])
def test_capacity_check_switch(attribute: str, default: bool, expected: bool) -> None:
    template = Template()
    if attribute:
        template.set("DATASTORE_CAPACITY_CHECK", attribute)
    assert bc.capacity_check_on(Datastore(id=1, name="b", template=template), default) is expected


def test_check_space() -> None:
    bc.check_space(Capacity(1000, 96, 904), 96)
    with pytest.raises(ActionError, match="^Not enough free space on target datastore$"):
        bc.check_space(Capacity(1000, 95, 905), 96)


def test_target_datastore_messages() -> None:
    class Objects:
        @property
        def datastores(self) -> Objects:
            return self

        def find(self, obj_id: int) -> Datastore | None:
            return {1: Datastore(id=1, name="imgs"), 2: Datastore(id=2, name="b", type=DatastoreType.BACKUP_DS,
                                                                   ds_mad="rsync")}.get(obj_id)

    assert bc.target_datastore(Objects(), 2).id == 2  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="^Datastore needs to be of type BACKUP$"):
        bc.target_datastore(Objects(), 1)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match=r"Error getting datastore \[9\]"):
        bc.target_datastore(Objects(), 9)  # type: ignore[arg-type]


def test_disk_sources_follow_the_domain_by_target() -> None:
    current = [Disk("vda", path="/d/vda.qcow2", format="qcow2"), Disk("vdb", path="/d/vdb.raw", format="raw"),
               Disk("vdc", type="network", path=None)]
    the_vm = vm(disks=(disk(0, "vda"), disk(1, "vdb")))
    assert bc.disk_sources(the_vm, the_vm.template.vectors("DISK"), current) == ([
        DiskSource(0, "vda", "/d/vda.qcow2", "qcow2"), DiskSource(1, "vdb", "/d/vdb.raw", "raw")], [])
    for missing in (disk(2, "vdc"), disk(3, "vdz")):
        with pytest.raises(ActionError, match="is not a file or RBD disk of the domain"):
            bc.disk_sources(the_vm, [missing], current)


def test_rbd_disks_are_reached_as_the_disk_then_the_host_then_libvirt_say() -> None:
    current = [Disk("vdc", type="network", protocol="rbd", pool="one", image="one-7-2", auth_username="libvirt",
                    hosts=(NetworkHost("10.0.0.1", 6789),))]
    the_vm = vm(disks=(disk(2, "vdc"),))
    host = Host(id=0, name="kvm1")
    host.template.set("CEPH_CONF", "/etc/ceph/prod.conf")
    host.template.set("CEPH_USER", "backup")
    files, rbd = bc.disk_sources(the_vm, the_vm.template.vectors("DISK"), current, host)
    assert files == [] and rbd == [RbdSource(2, "vdc", "one", "one-7-2",
                                             RbdAccess("backup", "", "/etc/ceph/prod.conf", ("10.0.0.1:6789",)))]
    own = disk(2, "vdc")
    own["CEPH_USER"] = "vm7"
    own["CEPH_HOST"] = "m1:3300 m2"
    [source] = bc.disk_sources(the_vm, [own], current, host)[1]
    assert source.access == RbdAccess("vm7", "", "/etc/ceph/prod.conf", ("m1:3300", "m2"))
    own["CEPH_CONF"] = "relative.conf"
    with pytest.raises(ActionError, match="VM 7: disk 2 \\(vdc\\): CEPH_CONF 'relative.conf' must be an absolute"):
        bc.disk_sources(the_vm, [own], current, host)


def test_backup_image_record() -> None:
    ds = Datastore(id=100, name="backups", type=DatastoreType.BACKUP_DS, ds_mad="rsync")
    upload = UploadResult(size_mb=12, sha256={"vm.xml": "b" * 64, "disk.0.0": "a" * 64})
    when = 1701437816  # 2023-12-01 13.36.56 UTC
    image = bc.backup_image(4, vm(), ds, "1a2b3c", upload, [0, 1], when, UTC)
    assert (image.id, image.name, image.type, image.source, image.size, image.format) == (
        4, "7 01-Dec 13.36.56", ImageType.BACKUP, "1a2b3c", 12, "raw")
    assert (image.ownership.uid, image.permissions.octal(), image.datastore_id, image.datastore) == (5, "600", 100,
                                                                                                     "backups")
    assert (image.vms, image.backup_disk_ids, image.regtime) == ([7], [0, 1], when)
    assert [(c["FILE"], c["SHA256"]) for c in image.template.vectors("CHECKSUMS")] == [
        ("disk.0.0", "a" * 64), ("vm.xml", "b" * 64)]
    assert bc.image_name(0, when, ZoneInfo("Europe/Madrid")) == "0 01-Dec 14.36.56"
    sized = bc.backup_image(4, vm(), ds, "1a2b3c", upload, [0, 1], when, UTC, {"disk.0.0": 64 << 20})
    assert [(c["FILE"], c.get("VIRTUAL_SIZE")) for c in sized.template.vectors("CHECKSUMS")] == [
        ("disk.0.0", str(64 << 20)), ("vm.xml", None)]
    assert to_images.recorded_sizes(sized, [0]) == {0: 64}
    assert to_images.recorded_sizes(image, [0]) is None  # recorded before the sizes were: vm.xml says
    assert to_images.recorded_sizes(sized, [0, 1]) is None


class Links:
    def __init__(self, known_hosts: Path) -> None:
        self.settings = SshSettings(known_hosts=known_hosts, key=Path("/etc/vmsched/id"))


def rsync_ds(ds_id: int = 1) -> Datastore:
    ds = Datastore(id=ds_id, name="r", ds_mad="rsync")
    ds.template.set("RSYNC_HOST", "backup.example")
    ds.template.set("RSYNC_PORT", "2222")
    return ds


async def test_upload_ssh_installs_the_verified_server_key_on_the_hypervisor(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    known = tmp_path / "known_hosts"
    key = asyncssh.generate_private_key("ssh-ed25519")
    hostkeys.accept_host_key(known, "backup.example", 2222, key)
    hostkeys.accept_host_key(known, "other.example", 22, asyncssh.generate_private_key("ssh-ed25519"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the "hypervisor" here is this machine's runner
    remote = Host(id=0, name="h")
    remote.template.set("SSH_HOST", "kvm1")

    argv = await btr.upload_ssh(Links(known), remote, LocalRunner(), rsync_ds())
    installed = tmp_path / "home/.ssh/vmsched_known_hosts.backup.example_2222"
    assert f"UserKnownHostsFile={installed}" in argv
    assert installed.read_text() == hostkeys.entry_line("backup.example", 2222, key)  # that server's key only
    assert installed.stat().st_mode & 0o777 == 0o600
    assert argv[-2:] == ["-i", "/etc/vmsched/id"] and "IdentitiesOnly=yes" not in argv  # own keys as fallback
    assert hostkeys.known_keys(installed, "backup.example", 2222)[0].public_data == key.public_data
    shared = tmp_path / "home/.ssh/vmsched-mux"  # uploads share one connection per server, for a minute
    assert ["-o", "ControlMaster=auto", "-o", f"ControlPath={shared}/%C", "-o", "ControlPersist=60"] == \
        argv[argv.index("ControlMaster=auto") - 1:argv.index("ControlMaster=auto") + 5]
    assert shared.is_dir() and shared.stat().st_mode & 0o777 == 0o700
    before = installed.stat().st_mtime_ns
    restore = await btr.upload_ssh(Links(known), remote, LocalRunner(), rsync_ds(), share=False)
    assert installed.stat().st_mtime_ns == before  # unchanged: not rewritten
    assert not any("Control" in word for word in restore)  # a restore's copy has a connection of its own
    restic = Datastore(id=1, name="r", ds_mad="restic")  # restic keeps its own connection (see upload_ssh)
    restic.template.set("RESTIC_SFTP_SERVER", "backup.example")
    restic.template.set("RESTIC_SFTP_PORT", "2222")
    assert not any("Control" in word for word in await btr.upload_ssh(Links(known), remote, LocalRunner(), restic))
    remote.template.set("BACKUP_SSH_SHARE", "no")
    assert not any("Control" in word for word in await btr.upload_ssh(Links(known), remote, LocalRunner(), rsync_ds()))

    local = Host(id=1, name="me")  # no SSH_HOST: the scheduler's machine uses vmsched's own file
    assert f"UserKnownHostsFile={known}" in await btr.upload_ssh(Links(known), local, LocalRunner(), rsync_ds())


async def test_upload_ssh_host_overrides_and_the_fs_datastore(tmp_path: Path) -> None:
    host = Host(id=0, name="h")
    host.template.set("BACKUP_SSH_KEY", "/root/.ssh/backup")
    host.template.set("BACKUP_KNOWN_HOSTS", "/root/.ssh/backup_known_hosts")
    links = Links(tmp_path / "none")
    rsync = await btr.upload_ssh(links, host, LocalRunner(), rsync_ds())
    assert rsync[-4:] == ["-o", "IdentitiesOnly=yes", "-i", "/root/.ssh/backup"]
    assert "UserKnownHostsFile=/root/.ssh/backup_known_hosts" in rsync
    fs = await btr.upload_ssh(links, host, LocalRunner(), Datastore(id=2, name="f", ds_mad="fs"))
    assert fs[-2:] == ["-i", "/etc/vmsched/id"] and f"UserKnownHostsFile={tmp_path / 'none'}" in fs
    for argv in (rsync, fs):
        assert "StrictHostKeyChecking=yes" in argv and "BatchMode=yes" in argv


async def test_upload_to_a_server_whose_key_was_never_verified_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ActionError, match=r"backup\.example:2222.*not known.*vmsched datastore accept-hostkey 7"):
        await btr.upload_ssh(Links(tmp_path / "known_hosts"), Host(id=0, name="h"), LocalRunner(), rsync_ds(7))


# ---- recovery against the real environment ----------------------------------------------------------


@pytest.fixture
async def recovery(realenv: RealEnv, tmp_path: Path) -> AsyncIterator[tuple[State, HostLinks, str]]:
    store = await Store.open(tmp_path / "s.db")
    state = State(store, build_codecs())
    await state.load()
    links = HostLinks(tmp_path, SshSettings(known_hosts=realenv.ssh.known_hosts, key=realenv.ssh.client_key))
    marker = f"vmsched-bkrec-{uuid.uuid4().hex[:10]}"
    host1, backup = realenv.host("host1"), realenv.backup
    host = Host(id=0, name="host1")
    for name, value in (("SSH_HOST", host1.address), ("SSH_PORT", str(host1.ssh_port)), ("SSH_USER", host1.user)):
        host.template.set(name, value)
    ds = Datastore(id=100, name="b", type=DatastoreType.BACKUP_DS, ds_mad="rsync")
    for name, value in (("RSYNC_HOST", backup.address), ("RSYNC_PORT", str(backup.ssh_port)),
                        ("RSYNC_USER", backup.user), ("BASE_PATH", f"{backup.data_dir}/{marker}")):
        ds.template.set(name, value)
    async with state.mutation() as m:
        m.put("host", host)
        m.put("datastore", ds)
        m.put("vm", vm(VmState.ACTIVE, LcmState.BACKUP))
    try:
        yield state, links, marker
    finally:
        server = links.pool.runner(SshTarget(backup.address, backup.ssh_port, backup.user))
        await server.run(["rm", "-rf", "--", f"{backup.data_dir}/{marker}"], timeout=20)
        await links.runner(host).run(["rm", "-rf", "--", f"/var/tmp/{marker}"], timeout=20)
        await links.close()
        await store.close()


@pytest.mark.realenv
async def test_recoverer_undoes_an_interrupted_run(recovery: tuple[State, HostLinks, str], realenv: RealEnv) -> None:
    state, links, marker = recovery
    host, backup = state.get("host", 0), realenv.backup
    staging = f"/var/tmp/{marker}/7/42"
    hypervisor = links.runner(host)
    server = links.pool.runner(SshTarget(backup.address, backup.ssh_port, backup.user))
    vm_dir = f"{backup.data_dir}/{marker}/7"
    await hypervisor.run(["sh", "-c", 'mkdir -p "$1" && echo x > "$1/disk.0.0"', "sh", staging], timeout=20)
    await server.run(["mkdir", "-p", f"{vm_dir}/.tmp-aaaaaa", f"{vm_dir}/bbbbbb", f"{vm_dir}/cccccc"], timeout=20)
    async with state.mutation() as m:  # cccccc is a recorded backup: never touched
        m.put("image", Image(id=0, name="7 x", type=ImageType.BACKUP, source="cccccc", datastore_id=100, vms=[7]))
    run = Run(id=42, vm_id=7, action="backup", args="100,0", scheduled=0, steps=[
        bsteps.step("state", vm=7, state=int(VmState.ACTIVE), lcm=int(LcmState.RUNNING)),
        bsteps.step("staging", host=0, domain="no-such-domain", path=staging),
        bsteps.step("upload", datastore=100, vm=7, backup_id="bbbbbb"),
    ])
    await brec.make_recoverer(state, links)(run)
    listing = (await server.run(["ls", "-A", vm_dir], timeout=20)).stdout.decode().split()
    assert listing == ["cccccc"]
    gone = await hypervisor.run(["test", "-e", f"/var/tmp/{marker}/7"], timeout=20, check=False)
    assert gone.exit_status == 1
    after = state.get("vm", 7)
    assert (after.state, after.lcm_state) == (VmState.ACTIVE, LcmState.RUNNING) and run.steps == []


@pytest.mark.parametrize(("tools", "ds_mad", "missing"), [
    ({"TOOL_QEMU_IMG": "YES", "TOOL_RESTIC": "NO", "TOOL_RSYNC": "YES"}, "restic", "no restic"),
    ({"TOOL_QEMU_IMG": "NO", "TOOL_RSYNC": "NO"}, "rsync", "no qemu-img and no rsync"),
    ({"TOOL_QEMU_IMG": "NO"}, "fs", "no qemu-img"),
    ({"TOOL_QEMU_IMG": "YES", "TOOL_RESTIC": "NO"}, "rsync", None),  # restic is not needed for rsync
    ({}, "restic", None),  # not monitored yet: not judged
])
def test_a_host_without_a_needed_tool_is_refused_before_anything_starts(tools: dict[str, str], ds_mad: str,
                                                                        missing: str | None) -> None:
    host = Host(id=1, name="kvm1")
    for key, value in tools.items():
        host.template.set(key, value)
    datastore = Datastore(id=4, name="b", ds_mad=ds_mad)
    if missing is None:
        bc.check_tools(host, datastore)
        return
    with pytest.raises(ActionError, match=f"host kvm1 has {missing} .*install .* {ds_mad} datastore 4"):
        bc.check_tools(host, datastore)
