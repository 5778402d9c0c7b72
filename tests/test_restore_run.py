"""The pure parts of an in-place restore (ARGS, checks, names, the VM after it, the schedule refusal) and,
against the real environment, the recovery of a restore the daemon died in."""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from scheduler.actions.executor import RecovererByAction
from scheduler.actions.registry import ACTIONS, is_backup, validate_action
from scheduler.actions.restore import RestoreArgs, parse_args
from scheduler.engine.journal import Run
from scheduler.errors import ActionError, NotFound, ValidationError
from scheduler.hosts.links import HostLinks
from scheduler.model.objects.host import Host
from scheduler.model.objects.image import Image
from scheduler.model.objects.states import ImageType, LcmState, VmState
from scheduler.model.objects.vm import History, Vm
from scheduler.model.schedule import parse_sched_action
from scheduler.model.template import Template, Vector
from scheduler.restore import disk as rd
from scheduler.restore import in_place as rr
from scheduler.store.codecs import build_codecs
from scheduler.store.sqlite import Store
from scheduler.store.state import State
from tests.realenv.domains import Hypervisor, TinyDomain
from tests.realenv.model import RealEnv
from tests.test_restore_real import leave_metadata

SHA = "ab" * 32


def vm(state: VmState = VmState.POWEROFF, lcm: LcmState = LcmState.LCM_INIT, disks: tuple[tuple[int, str], ...] = (
        (0, "vda"), (1, "vdb")), config: dict[str, str] | None = None) -> Vm:
    template = Template()
    for disk_id, target in disks:
        template.add("DISK", Vector([("DISK_ID", str(disk_id)), ("TARGET", target)]))
    return Vm(id=7, name="db", state=state, lcm_state=lcm, template=template, backup_ids=[3],
              history=[History(seq=0, hostname="host1", hid=0, stime=1)],
              backup_config=Vector(list((config or {}).items())))


def image(image_id: int = 3, *, kind: ImageType = ImageType.BACKUP, vms: tuple[int, ...] = (7,),
          disks: tuple[int, ...] = (0, 1), sums: dict[str, str] | None = None) -> Image:
    img = Image(id=image_id, name="7 x", type=kind, source="abc123", datastore_id=100, vms=list(vms),
                backup_disk_ids=list(disks))
    for name, digest in (sums if sums is not None else {"disk.0.0": SHA, "disk.1.0": SHA}).items():
        img.template.add("CHECKSUMS", Vector([("FILE", name), ("SHA256", digest)]))
    return img


class Pools:
    """Enough of a State for the pure checks: ``find`` over a few objects."""

    def __init__(self, *images: Image) -> None:
        self.images = self  # state.images.find(id)
        self._images = {i.id: i for i in images}

    def find(self, obj_id: int) -> Image | None:
        return self._images.get(obj_id)


# ---- ARGS and the registry ------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "expected"), [
    ("3,-1,-1", RestoreArgs(3, -1, -1)),
    (" 3 , 0 , 1 ", RestoreArgs(3, 0, 1)),
    ("3", None), ("3,-1", None), ("3,-1,-1,0", None), ("x,-1,-1", None), ("-1,-1,-1", None), ("3,-2,-1", None),
    ("3,-1,-2", None), ("", None),
])
def test_restore_args(args: str, expected: RestoreArgs | None) -> None:
    if expected is None:
        with pytest.raises(ValidationError, match="Missing or malformed ARGS for: restore"):
            parse_args(args)
    else:
        assert parse_args(args) == expected
        assert parse_args(expected.text()) == expected


def test_restore_is_an_engine_run_but_never_a_scheduled_action() -> None:
    assert "restore" in ACTIONS and not is_backup("restore")
    sched = Vector([("ACTION", "restore"), ("ARGS", "3,-1,-1"), ("TIME", "100")])
    with pytest.raises(ValidationError, match="restore cannot be a scheduled action"):
        parse_sched_action(sched, origin=0, validate_action=validate_action)
    with pytest.raises(ValidationError, match="restore is not supported"):
        parse_sched_action(sched, origin=0)  # the hook-less check: OpenNebula's VM_ACTIONS
    validate_action("backup", "100,0")  # scheduled actions still pass


# ---- request checks -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("the_vm", "images", "request_", "expected"), [
    (vm(), (image(),), (3, -1, -1), [0, 1]),
    (vm(), (image(),), (3, 0, 1), [1]),
    (vm(VmState.ACTIVE, LcmState.RUNNING), (image(),), (3, -1, -1), "must be powered off to be restored; it is RUNNING"),
    (vm(VmState.ACTIVE, LcmState.RESTORE), (image(),), (3, -1, -1), "it is RESTORE"),
    (vm(), (image(kind=ImageType.DATABLOCK),), (3, -1, -1), "image 3 is not a backup image (TYPE DATABLOCK)"),
    (vm(), (image(vms=(8,)),), (3, -1, -1), "backup image 3 is a backup of 8, not of VM 7"),
    (vm(), (image(),), (3, 1, -1), "has no increment 1"),
    (vm(), (image(),), (3, -1, 4), "backup image 3 has no disk 4 (its disks: 0, 1)"),
    (vm(disks=((0, "vda"),)), (image(),), (3, -1, -1), "VM 7 has no disk 1 any more"),
])
def test_check_request(the_vm: Vm, images: tuple[Image, ...], request_: tuple[int, int, int],
                       expected: list[int] | str) -> None:
    state = Pools(*images)
    if isinstance(expected, str):
        with pytest.raises(ActionError) as caught:
            rr.check_request(state, the_vm, *request_)  # type: ignore[arg-type]
        assert expected in str(caught.value)
    else:
        found, disk_ids = rr.check_request(state, the_vm, *request_)  # type: ignore[arg-type]
        assert found.id == request_[0] and disk_ids == expected


def test_a_missing_image_is_not_found() -> None:
    with pytest.raises(NotFound, match=r"Error getting image \[9\]"):
        rr.check_request(Pools(), vm(), 9, -1, -1)  # type: ignore[arg-type]


# ---- names, the disks of the domain, the VM afterwards -------------------------------------------------------


def test_temporary_names_carry_the_run_and_no_run_is_a_prefix_of_another() -> None:
    assert rd.temp_path("/d/vda.qcow2", "fetch", 5) == "/d/vda.qcow2.vmsched-fetch-5.part"
    assert rd.temp_paths("/d/x", 5) == ["/d/x.vmsched-fetch-5.part", "/d/x.vmsched-raw-5.part"]
    first = rd.temp_path("/d/x", "fetch", 5)  # a chain's later files: the first one's name, then .<n>
    assert [rd.link_path(first, n) for n in range(3)] == [first, f"{first}.1", f"{first}.2"]
    assert rr.new_path("/d/x", 5) == "/d/x.vmsched-new-5.part" and rr.old_path("/d/x", 5) == "/d/x.vmsched-old-5.part"
    assert rr.new_path("/d/x", 5) not in rr.new_path("/d/x", 53)
    with pytest.raises(ValueError, match="unknown temporary file kind"):
        rd.temp_path("/d/x", "other", 5)


@pytest.mark.parametrize(("path", "fmt", "message"), [
    ("relative/x", "qcow2", "absolute path"), ("/d/a b", "qcow2", "absolute path"), ("/d/../x", "raw", "'..'"),
    ("/d/x", "vmdk", "format must be one of qcow2, raw"),
])
def test_fetch_targets_are_checked(path: str, fmt: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        rd.checked_target(path, fmt)


def test_checksums_and_files_of_an_image() -> None:
    assert rd.backup_file(image(), 1) == "disk.1.0"
    assert rd.recorded_sha256(image(), "disk.1.0") == SHA
    with pytest.raises(ActionError, match="records no sha256 for disk.1.0: it cannot be verified"):
        rd.recorded_sha256(image(sums={"disk.0.0": SHA}), "disk.1.0")
    with pytest.raises(ActionError, match="has no disk 2"):
        rd.backup_file(image(), 2)
    with pytest.raises(ActionError, match="names no VM"):
        rd.backup_vm_id(image(vms=()))


DOMAIN = """<domain><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/d/vda.qcow2'/><target dev='vda'/></disk>
<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='/d/vdb.raw'/><target dev='vdb'/></disk>
<disk type='network' device='disk'><driver name='qemu' type='raw'/><source protocol='rbd' name='p/i'/><target dev='vdc'/></disk>
</devices></domain>"""


def test_disk_files_follow_the_domain_by_target_and_keep_formats() -> None:
    files = rr.disk_files(vm(), [0, 1], DOMAIN, 9)
    assert [(f.disk_id, f.path, f.format, f.new, f.old) for f in files] == [
        (0, "/d/vda.qcow2", "qcow2", "/d/vda.qcow2.vmsched-new-9.part", "/d/vda.qcow2.vmsched-old-9.part"),
        (1, "/d/vdb.raw", "raw", "/d/vdb.raw.vmsched-new-9.part", "/d/vdb.raw.vmsched-old-9.part"),
    ]
    with pytest.raises(ActionError, match=r"disk 2 \(vdc\) is not a qcow2 or raw file disk"):
        rr.disk_files(vm(disks=((2, "vdc"),)), [2], DOMAIN, 9)


def test_the_vm_after_a_restore() -> None:
    before = vm(VmState.ACTIVE, LcmState.RESTORE, config={"MODE": "INCREMENT", "INCREMENTAL_BACKUP_ID": "3",
                                                           "LAST_INCREMENT_ID": "2", "KEEP_LAST": "4"})
    before.template.add("SNAPSHOT", Vector([("SNAPSHOT_ID", "0"), ("NAME", "s")]))
    after = rr.restored_vm(before, (VmState.POWEROFF, LcmState.LCM_INIT))
    assert (after.state, after.lcm_state) == (VmState.POWEROFF, LcmState.LCM_INIT)
    assert after.backup_config["INCREMENTAL_BACKUP_ID"] == "-1" and after.backup_config["LAST_INCREMENT_ID"] == "-1"
    assert after.backup_config["KEEP_LAST"] == "4" and after.template.vectors("SNAPSHOT") == []


async def test_recoverers_are_chosen_by_action() -> None:
    called: list[str] = []

    async def backup(run: Run) -> None:
        called.append(f"backup {run.id}")

    async def restore(run: Run) -> None:
        called.append(f"restore {run.id}")

    recover = RecovererByAction(backup, {"restore": restore})
    for run_id, action in ((1, "backup"), (2, "restore"), (3, "reboot")):
        await recover(Run(id=run_id, vm_id=7, action=action, args="", scheduled=0))
    assert called == ["backup 1", "restore 2", "backup 3"]


# ---- recovery against the real environment ----------------------------------------------------------


@pytest.fixture
async def recovery(realenv: RealEnv, tmp_path: Path) -> AsyncIterator[tuple[State, HostLinks]]:
    store = await Store.open(tmp_path / "s.db")
    state = State(store, build_codecs())
    await state.load()
    links = HostLinks(tmp_path, _settings(realenv))
    host1 = realenv.host("host1")
    host = Host(id=0, name="host1")
    for name, value in (("SSH_HOST", host1.address), ("SSH_PORT", str(host1.ssh_port)), ("SSH_USER", host1.user)):
        host.template.set(name, value)
    async with state.mutation() as m:
        m.put("host", host)
        m.put("vm", vm(VmState.ACTIVE, LcmState.RESTORE, config={"INCREMENTAL_BACKUP_ID": "3",
                                                                  "LAST_INCREMENT_ID": "0"}))
    try:
        yield state, links
    finally:
        await links.close()
        await store.close()


def _settings(realenv: RealEnv) -> object:
    from drivers.ssh import SshSettings

    return SshSettings(known_hosts=realenv.ssh.known_hosts, key=realenv.ssh.client_key)


def _state_steps() -> list[dict]:
    return [rd.step("state", vm=7, state=int(VmState.POWEROFF), lcm=int(LcmState.LCM_INIT))]


@pytest.mark.realenv
async def test_recovery_before_the_swap_kills_and_removes_what_the_run_left(
        recovery: tuple[State, HostLinks], tiny_domain: Callable[..., TinyDomain]) -> None:
    state, links = recovery
    dom = tiny_domain("host1", start=False)
    runner = links.runner(state.get("host", 0))
    new = rr.new_path(str(dom.vda), 42)
    fetched = rd.temp_path(new, "fetch", 42)
    await runner.run(["sh", "-c", 'echo partial > "$1"; echo partial > "$2"', "sh", new, fetched], timeout=20)
    await runner.run(["sh", "-c", 'setsid sh -c "sleep 300" "$1" >/dev/null 2>&1 </dev/null &', "sh", fetched],
                     timeout=20)  # a copy still running, naming the file it writes
    run = Run(id=42, vm_id=7, action="restore", args="3,-1,-1", scheduled=0, steps=[
        *_state_steps(), rd.step("temp", host=0, path=new), rd.step("temp", host=0, path=fetched)])
    await rr.make_recoverer(state, links)(run)
    assert sorted(p.name for p in dom.directory.iterdir()) == ["vda.qcow2", "vdb.raw"]
    left = await runner.run(["sh", "-c", 'pgrep -f -- "$(cat)"'], input=fetched.encode(), timeout=20, check=False)
    assert left.exit_status == 1, left.stdout  # (the marker reaches pgrep on stdin: no argv names it)
    after = state.get("vm", 7)
    assert (after.state, after.lcm_state) == (VmState.POWEROFF, LcmState.LCM_INIT) and run.steps == []
    assert after.backup_config["INCREMENTAL_BACKUP_ID"] == "3"  # nothing was restored: the chain stays


def _crashed_swap(disks: list[tuple[str, str, str]], crashed_after: str) -> dict[str, bytes]:
    """The verified new disks (a marked copy of each current one), and the swap as far as it got; the marks."""
    contents = {}
    for current, new, _ in disks:
        subprocess.run(["cp", current, new], check=True, timeout=20)
        contents[current] = secrets.token_bytes(16)
        with open(new, "ab") as f:
            f.write(contents[current])
    vda, vda_new, vda_old = disks[0]
    if crashed_after in ("first rename", "one disk"):
        Path(vda).rename(vda_old)
    if crashed_after == "one disk":
        Path(vda_new).rename(vda)
    return contents


def _tails(disks: list[tuple[str, str, str]]) -> dict[str, bytes]:
    return {current: Path(current).read_bytes()[-16:] for current, _, _ in disks}


@pytest.mark.realenv
@pytest.mark.parametrize("crashed_after", ["nothing", "first rename", "one disk"])
async def test_recovery_after_the_swap_began_finishes_it(
        recovery: tuple[State, HostLinks], tiny_domain: Callable[..., TinyDomain],
        hypervisors: Callable[[str], Hypervisor], crashed_after: str) -> None:
    state, links = recovery
    dom = tiny_domain("host1", start=False)
    host1 = hypervisors("host1")
    disks = [(str(p), rr.new_path(str(p), 42), rr.old_path(str(p), 42)) for p in (dom.vda, dom.vdb)]
    contents = _crashed_swap(disks, crashed_after)
    leave_metadata(host1, dom)
    uuid = host1.lookup(dom).UUIDString()
    run = Run(id=42, vm_id=7, action="restore", args="3,-1,-1", scheduled=0, steps=[
        *_state_steps(), rd.step("temp", host=0, path=disks[0][1]),
        rd.step("swap", host=0, domain=uuid, vm=7, disks=[list(d) for d in disks])])
    await rr.make_recoverer(state, links)(run)
    assert run.steps == []
    assert _tails(disks) == contents
    assert sorted(p.name for p in dom.directory.iterdir()) == ["vda.qcow2", "vdb.raw"]
    assert host1.lookup(dom).snapshotListNames() == [] and host1.lookup(dom).listAllCheckpoints() == []
    after = state.get("vm", 7)
    assert (after.state, after.lcm_state) == (VmState.POWEROFF, LcmState.LCM_INIT)
    assert after.backup_config["INCREMENTAL_BACKUP_ID"] == "-1"
