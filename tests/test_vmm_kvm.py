"""drivers.vmm.kvm against the real hosts (libvirtd over qemu+ssh, TCG domains), plus its pure parts."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from pathlib import Path

import libvirt
import pytest
import pytest_asyncio

from drivers.vmm import errors as vmm_errors
from drivers.vmm import kvm as kvm_module
from drivers.vmm.domainxml import INTERNAL_SNAPSHOT_REASON
from drivers.vmm.errors import (
    CommitTimeout,
    DomainNotFound,
    GuestAgentError,
    OperationRefused,
    VmmError,
)
from drivers.vmm.kvm import KvmHost
from drivers.vmm.states import DomainState, StateChange, state_from_event, state_from_libvirt
from drivers.vmm.uri import check_uri, host_uri, ssh_uri
from scheduler.errors import DriverError, NotFound, ValidationError
from tests.realenv import domains
from tests.realenv.domains import Hypervisor, TinyDomain
from tests.realenv.model import RealEnv
from tests.realenv.procs import run

EVENT_WAIT = 10.0  # seconds: an event that does not come within this is a failure


def real(fn: Callable[..., object]) -> Callable[..., object]:
    """Mark an async test as needing the real environment, on the module's event loop."""
    return pytest.mark.realenv(pytest.mark.asyncio(loop_scope="module")(fn))


# ---------------------------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize(("state", "expected"), [
    (libvirt.VIR_DOMAIN_RUNNING, DomainState.RUNNING),
    (libvirt.VIR_DOMAIN_BLOCKED, DomainState.RUNNING),
    (libvirt.VIR_DOMAIN_PAUSED, DomainState.PAUSED),
    (libvirt.VIR_DOMAIN_SHUTDOWN, DomainState.SHUTDOWN),
    (libvirt.VIR_DOMAIN_SHUTOFF, DomainState.SHUTOFF),
    (libvirt.VIR_DOMAIN_CRASHED, DomainState.CRASHED),
    (libvirt.VIR_DOMAIN_PMSUSPENDED, DomainState.PMSUSPENDED),
    (libvirt.VIR_DOMAIN_NOSTATE, DomainState.UNKNOWN),
    (99, DomainState.UNKNOWN),
])
def test_state_from_libvirt(state: int, expected: DomainState) -> None:
    assert state_from_libvirt(state) is expected


@pytest.mark.parametrize(("event", "expected"), [
    (libvirt.VIR_DOMAIN_EVENT_STARTED, DomainState.RUNNING),
    (libvirt.VIR_DOMAIN_EVENT_SUSPENDED, DomainState.PAUSED),
    (libvirt.VIR_DOMAIN_EVENT_RESUMED, DomainState.RUNNING),
    (libvirt.VIR_DOMAIN_EVENT_STOPPED, DomainState.SHUTOFF),
    (libvirt.VIR_DOMAIN_EVENT_SHUTDOWN, DomainState.SHUTDOWN),
    (libvirt.VIR_DOMAIN_EVENT_CRASHED, DomainState.CRASHED),
    (libvirt.VIR_DOMAIN_EVENT_UNDEFINED, DomainState.UNDEFINED),
    (libvirt.VIR_DOMAIN_EVENT_DEFINED, None),
])
def test_state_from_event(event: int, expected: DomainState | None) -> None:
    assert state_from_event(event) is expected


def libvirt_error(code: int, domain: int, message: str) -> libvirt.libvirtError:
    exc = libvirt.libvirtError(message)
    exc.err = (code, domain, message, libvirt.VIR_ERR_ERROR, None, None, None, 0, 0)
    return exc


@pytest.mark.parametrize(("code", "domain", "message", "kind", "retryable"), [
    (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_RPC, "Cannot recv data: Connection reset", VmmError, True),
    (libvirt.VIR_ERR_RPC, libvirt.VIR_FROM_RPC, "rpc failed", VmmError, True),
    (libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_FROM_NONE, "no connection driver", VmmError, True),
    (libvirt.VIR_ERR_INVALID_CONN, libvirt.VIR_FROM_NONE, "invalid connection pointer", VmmError, True),
    (libvirt.VIR_ERR_OPERATION_TIMEOUT, libvirt.VIR_FROM_QEMU, "cannot acquire state change lock", VmmError, True),
    (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_QEMU, "cannot create file", VmmError, False),
    (libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_FROM_QEMU, "domain is not running", VmmError, False),
    (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_FROM_QEMU, "Domain not found", DomainNotFound, False),
    (libvirt.VIR_ERR_AGENT_UNRESPONSIVE, libvirt.VIR_FROM_QEMU,
     "Guest agent is not responding: QEMU guest agent is not connected", GuestAgentError, False),
    (libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED, libvirt.VIR_FROM_QEMU,
     "argument unsupported: QEMU guest agent is not configured", GuestAgentError, False),
    (libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED, libvirt.VIR_FROM_QEMU, "argument unsupported: flag", VmmError, False),
])
def test_libvirt_errors_become_typed_driver_errors(code: int, domain: int, message: str, kind: type,
                                                   retryable: bool) -> None:
    error = vmm_errors.from_libvirt(libvirt_error(code, domain, message), "host1", "web1", "snapshot")
    assert type(error) is kind and isinstance(error, DriverError)
    assert str(error) == f"host1: domain 'web1': snapshot: {message}"
    assert (error.host, error.retryable, error.code) == ("host1", retryable, code)
    assert isinstance(error, NotFound) is (kind is DomainNotFound)


def test_error_without_domain_names_host_and_operation() -> None:
    error = vmm_errors.from_libvirt(libvirt_error(libvirt.VIR_ERR_RPC, libvirt.VIR_FROM_RPC, "x"), "h", None, "list")
    assert str(error) == "h: list: x"


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"address": "hv1"}, "qemu+ssh://root@hv1/system?no_tty=1"),
    ({"address": "10.0.0.5", "port": 2222, "user": "oneadmin", "command": "/etc/vmsched/ssh wrapper",
      "keyfile": "/k/id"},
     "qemu+ssh://oneadmin@10.0.0.5:2222/system?no_tty=1&command=/etc/vmsched/ssh%20wrapper&keyfile=/k/id"),
])
def test_ssh_uri(kwargs: dict, expected: str) -> None:
    assert ssh_uri(**kwargs) == expected


@pytest.mark.parametrize(("template", "expected"), [
    ({}, "qemu+ssh://root@hv9/system?no_tty=1&command=/w"),
    ({"SSH_HOST": "10.1.1.9", "SSH_PORT": "2201", "SSH_USER": "admin", "SSH_KEY": "/k"},
     "qemu+ssh://admin@10.1.1.9:2201/system?no_tty=1&command=/w&keyfile=/k"),
    ({"LIBVIRT_URI": "qemu:///system", "SSH_HOST": "ignored"}, "qemu:///system"),
])
def test_host_uri_from_template(template: dict[str, str], expected: str) -> None:
    assert host_uri(template, "hv9", ssh_command="/w") == expected


@pytest.mark.parametrize(("template", "message"), [
    ({"LIBVIRT_URI": "qemu+ssh://root@hv/system?no_verify=1"}, "no_verify"),
    ({"LIBVIRT_URI": "qemu+ssh://root@hv/system?keyfile=/k&No_Verify=yes"}, "no_verify"),
    ({"LIBVIRT_URI": "hv1"}, "no scheme"),
    ({"SSH_PORT": "ssh"}, "SSH_PORT 'ssh' is not a TCP port"),
    ({"SSH_PORT": "70000"}, "not a TCP port"),
])
def test_host_uri_refuses(template: dict[str, str], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        host_uri(template, "hv9")


def test_kvm_host_refuses_unverified_ssh() -> None:
    with pytest.raises(ValidationError, match="no_verify"):
        KvmHost("h", "qemu+ssh://root@127.0.0.1/system?no_verify=1")
    assert check_uri("qemu:///system?no_verify=0") == "qemu:///system?no_verify=0"


@pytest.mark.asyncio(loop_scope="module")
async def test_unreachable_host_is_a_retryable_error_naming_it() -> None:
    host = KvmHost("ghost", "qemu+tcp://127.0.0.1:1/system", call_timeout=10)
    try:
        with pytest.raises(VmmError, match=r"^ghost: connect qemu\+tcp://127.0.0.1:1/system: ") as caught:
            await host.list_domains()
        assert caught.value.retryable and caught.value.host == "ghost"
    finally:
        await host.close()


async def test_a_closed_host_refuses_calls_with_a_retryable_error() -> None:
    """A connection retired because the host's settings changed may still be held by a probe."""
    host = KvmHost("old", "qemu+tcp://127.0.0.1:1/system", call_timeout=10)
    await host.close()
    with pytest.raises(VmmError, match=r"^old: .*connection was closed") as caught:
        await host.versions()
    assert caught.value.retryable


# ---------------------------------------------------------------------------------------------- helpers


class SshRunner:
    """Runs an argv on a realenv host through the strict ssh wrapper (what the SSH layer does in production)."""

    def __init__(self, env: RealEnv, host: str) -> None:
        self.env, self.host = env, host

    async def __call__(self, argv: Sequence[str], *, time_limit: float) -> str:
        proc = await asyncio.create_subprocess_exec(*self.env.ssh_argv(self.host, list(argv)),
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        async with asyncio.timeout(time_limit):
            out, err = await proc.communicate()
        if proc.returncode != 0:
            raise DriverError(f"{self.host}: {argv[0]} exited with {proc.returncode}: {err.decode().strip()}",
                              host=self.host)
        return out.decode()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def kvm(realenv: RealEnv) -> AsyncIterator[Callable[[str], KvmHost]]:
    hosts: dict[str, KvmHost] = {}

    def get(name: str) -> KvmHost:
        if name not in hosts:
            hosts[name] = KvmHost(name, realenv.host(name).libvirt_uri, call_timeout=30,
                                  runner=SshRunner(realenv, name))
        return hosts[name]

    yield get
    for host in hosts.values():
        await host.close()


@pytest.fixture
def custom_domain(hypervisors: Callable[[str], Hypervisor], tmp_path: Path) -> Iterator[Callable[..., TinyDomain]]:
    """Like tiny_domain, with variations: an all-qcow2 domain, no agent channel, vda on a backing template."""
    made: list[TinyDomain] = []
    hv = hypervisors("host1")

    def make(*, vdb_qcow2: bool = False, agent: bool = True, vda_backing: Path | None = None,
             start: bool = True) -> TinyDomain:
        name = domains.new_name()
        vda, vdb, _ = domains.make_disks(tmp_path / "custom" / name)
        xml = domains.domain_xml(name, vda, vdb)
        if vdb_qcow2:
            vdb.unlink()
            vdb = vdb.with_suffix(".qcow2")
            run(["qemu-img", "create", "-q", "-f", "qcow2", str(vdb), "32M"])
            xml = domains.domain_xml(name, vda, vdb).replace("type='raw'", "type='qcow2'")
        if vda_backing is not None:
            run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(vda_backing), "-F", "qcow2", str(vda)])
        if not agent:
            xml = re.sub(r"<channel .*?</channel>", "", xml)
        dom = TinyDomain(name=name, host="host1", directory=vda.parent, vda=vda, vdb=vdb)
        hv.conn.defineXML(xml)
        made.append(dom)
        if start:
            hv.start(dom)
        return dom

    yield make
    for dom in reversed(made):
        hv.remove(dom)


def holds_pattern(image: Path, fmt: str, pattern: int = 0x5A, offset: str = "8M", length: str = "2M") -> bool:
    """Whether ``image`` (read through its backing chain, shared lock) holds ``pattern`` at offset..+length."""
    done = run(["qemu-io", "-r", "-U", "-f", fmt, "-c", f"read -P {pattern:#x} {offset} {length}", str(image)],
               check=False)
    return done.returncode == 0 and "verification failed" not in done.stdout + done.stderr


def delete_files(paths: Iterable[str]) -> None:
    for path in paths:
        Path(path).unlink()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------- real hosts


@real
async def test_find_by_name_and_uuid_and_list(kvm, tiny_domain) -> None:
    dom = tiny_domain()
    host1 = kvm("host1")
    found = await host1.find(dom.name)
    assert (found.name, found.state) == (dom.name, DomainState.RUNNING)
    assert await host1.find(found.uuid) == found
    assert await host1.find(found.uuid.upper()) == found
    assert found in await host1.list_domains()
    assert (await host1.poll_states())[found.uuid] is DomainState.RUNNING
    assert [d.target for d in await host1.disks(found.uuid)] == ["vda", "vdb"]


@real
async def test_domain_of_host1_is_not_found_on_host2(kvm, tiny_domain) -> None:
    dom = tiny_domain(start=False)
    uuid = (await kvm("host1").find(dom.name)).uuid
    with pytest.raises(DomainNotFound, match=rf"^host2: domain '{dom.name}' not found \(looked up by name\)$"):
        await kvm("host2").find(dom.name)
    with pytest.raises(DomainNotFound, match=rf"^host2: domain '{uuid}' not found \(looked up by UUID\)$") as caught:
        await kvm("host2").state(uuid)
    assert isinstance(caught.value, NotFound) and not caught.value.retryable
    assert dom.name not in {d.name for d in await kvm("host2").list_domains()}


@real
async def test_suspend_resume_with_lifecycle_events(kvm, tiny_domain) -> None:
    dom = tiny_domain()
    host1 = kvm("host1")
    changes: asyncio.Queue[StateChange] = asyncio.Queue()
    await host1.watch_states(changes.put_nowait)
    try:
        uuid = (await host1.find(dom.name)).uuid

        async def next_change() -> StateChange:
            async with asyncio.timeout(EVENT_WAIT):
                while (change := await changes.get()).uuid != uuid:
                    pass  # another test's domain
            return change

        await host1.suspend(dom.name)
        assert await next_change() == StateChange("host1", uuid, dom.name, DomainState.PAUSED)
        assert await host1.state(dom.name) is DomainState.PAUSED
        assert (await host1.poll_states())[uuid] is DomainState.PAUSED
        await host1.resume(dom.name)
        assert await next_change() == StateChange("host1", uuid, dom.name, DomainState.RUNNING)
        assert await host1.state(uuid) is DomainState.RUNNING
    finally:
        await host1.unwatch_states()


@real
async def test_errors_name_host_domain_and_operation(kvm, tiny_domain) -> None:
    dom = tiny_domain()
    expected = f"host1: domain '{dom.name}': resume: Requested operation is not valid: domain is already running"
    with pytest.raises(VmmError, match=f"^{re.escape(expected)}$") as caught:
        await kvm("host1").resume(dom.name)
    assert not caught.value.retryable and caught.value.code == libvirt.VIR_ERR_OPERATION_INVALID


@real
async def test_fsfreeze_surfaces_the_guest_agent_errors(kvm, tiny_domain, custom_domain) -> None:
    with_channel, without_channel = tiny_domain(), custom_domain(agent=False)
    with pytest.raises(GuestAgentError, match=rf"^host1: domain '{with_channel.name}': fsfreeze: "
                                              r".*QEMU guest agent is not connected"):
        await kvm("host1").fsfreeze(with_channel.name)
    with pytest.raises(GuestAgentError, match=rf"^host1: domain '{without_channel.name}': fsthaw: "
                                              r".*QEMU guest agent is not configured") as caught:
        await kvm("host1").fsthaw(without_channel.name)
    assert not caught.value.retryable


@real
async def test_snapshot_write_commit_pivot(kvm, tiny_domain, hypervisors, tmp_path) -> None:
    dom = tiny_domain()
    host1, hv = kvm("host1"), hypervisors("host1")
    overlays = {disk: str(tmp_path / "ov" / f"{disk}.vmsched-7.qcow2") for disk in ("vda", "vdb")}
    (tmp_path / "ov").mkdir()
    await host1.snapshot_disks(dom.name, overlays, name="vmsched-7")
    assert {d.target: d.path for d in await host1.disks(dom.name)} == overlays
    for disk in ("vda", "vdb"):
        hv.write_pattern(dom, disk)
    assert not holds_pattern(dom.vda, "qcow2") and not holds_pattern(dom.vdb, "raw")  # the writes hit the overlays
    for disk in ("vda", "vdb"):
        await host1.blockcommit(dom.name, disk, deadline=20)
    assert {d.target: d.path for d in await host1.disks(dom.name)} == {"vda": str(dom.vda), "vdb": str(dom.vdb)}
    assert holds_pattern(dom.vda, "qcow2") and holds_pattern(dom.vdb, "raw")
    delete_files(overlays.values())  # nothing uses them any more
    assert await host1.state(dom.name) is DomainState.RUNNING


@real
async def test_a_commit_left_running_by_a_dead_daemon_is_taken_over_and_pivoted(kvm, tiny_domain, hypervisors,
                                                                                tmp_path) -> None:
    """The daemon died between starting the commit and its pivot: the job waits, ready, in QEMU. Starting
    another commit would fail ("already in active block job"); blockcommit finishes that one instead."""
    dom = tiny_domain()
    host1, hv = kvm("host1"), hypervisors("host1")
    overlay = tmp_path / "vda.vmsched-8.qcow2"
    await host1.snapshot_disks(dom.name, {"vda": str(overlay)}, name="vmsched-8")
    hv.write_pattern(dom, "vda")
    flags = libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE | libvirt.VIR_DOMAIN_BLOCK_COMMIT_SHALLOW
    hv.lookup(dom).blockCommit("vda", None, None, 0, flags)  # what the dead daemon had started
    assert hv.lookup(dom).blockJobInfo("vda", 0)  # the job is there, waiting for its pivot
    await host1.blockcommit(dom.name, "vda", deadline=20)
    assert {d.target: d.path for d in await host1.disks(dom.name)}["vda"] == str(dom.vda)
    assert holds_pattern(dom.vda, "qcow2") and not hv.lookup(dom).blockJobInfo("vda", 0)
    delete_files([str(overlay)])


@real
async def test_snapshot_refuses_unknown_and_readonly_disks(kvm, tiny_domain, tmp_path) -> None:
    dom = tiny_domain(cdrom=True)
    with pytest.raises(OperationRefused, match=rf"^host1: domain '{dom.name}': snapshot: no disk 'vdz'"):
        await kvm("host1").snapshot_disks(dom.name, {"vdz": str(tmp_path / "o")})
    with pytest.raises(OperationRefused, match="read-only cdrom"):
        await kvm("host1").snapshot_disks(dom.name, {"hdc": str(tmp_path / "o")})


@real
async def test_commit_lands_in_vda_not_in_its_template(kvm, custom_domain, hypervisors, tmp_path) -> None:
    template = tmp_path / "template.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(template), "64M"])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", str(template)])
    before = sha256(template)
    dom = custom_domain(vda_backing=template)
    host1 = kvm("host1")
    overlay = tmp_path / "vda.overlay.qcow2"
    await host1.snapshot_disks(dom.name, {"vda": str(overlay)})
    hypervisors("host1").write_pattern(dom, "vda")
    await host1.blockcommit(dom.name, "vda", deadline=20)
    assert (await host1.disks(dom.name))[0].path == str(dom.vda)
    assert sha256(template) == before
    assert holds_pattern(dom.vda, "qcow2") and holds_pattern(dom.vda, "qcow2", 0x11, "0", "1M")
    assert not holds_pattern(template, "qcow2")


@real
async def test_commit_past_its_deadline_is_aborted_and_stays_on_the_overlay(kvm, tiny_domain, hypervisors,
                                                                             tmp_path) -> None:
    dom = tiny_domain()
    host1 = kvm("host1")
    overlay = tmp_path / "vda.ov.qcow2"
    await host1.snapshot_disks(dom.name, {"vda": str(overlay)})
    hypervisors("host1").write_pattern(dom, "vda", offset="8M", length="16M")
    with pytest.raises(CommitTimeout, match=rf"^host1: domain '{dom.name}': blockcommit vda: not ready to pivot "
                                            rf"within 0.2 s; job aborted, the guest still runs on overlay {overlay}$"
                       ) as caught:
        await host1.blockcommit(dom.name, "vda", deadline=0.2, bandwidth_mib=1)  # 16 MiB at 1 MiB/s: ~16 s
    assert caught.value.retryable
    assert (await host1.disks(dom.name))[0].path == str(overlay)
    assert not hypervisors("host1").lookup(dom).blockJobInfo("vda", 0)  # no job left behind
    await host1.blockcommit(dom.name, "vda", deadline=20)  # a later try succeeds
    assert (await host1.disks(dom.name))[0].path == str(dom.vda)


@real
async def test_power_actions(kvm, tiny_domain) -> None:
    dom = tiny_domain()
    host1 = kvm("host1")
    await host1.shutdown(dom.name)  # ACPI: the guest (no OS) ignores it
    await host1.reboot(dom.name)
    await host1.reset(dom.name)
    assert await host1.state(dom.name) is DomainState.RUNNING
    await host1.destroy(dom.name)
    assert await host1.state(dom.name) is DomainState.SHUTOFF
    with pytest.raises(VmmError, match=rf"^host1: domain '{dom.name}': reset: .*not running"):
        await host1.reset(dom.name)
    await host1.start(dom.name)
    assert await host1.state(dom.name) is DomainState.RUNNING


@real
async def test_system_snapshot_refused_with_a_raw_disk(kvm, tiny_domain) -> None:
    dom = tiny_domain(start=False)
    with pytest.raises(OperationRefused, match=re.escape(
            f"host1: domain '{dom.name}': system snapshot 's1': refused: disk vdb is raw; {INTERNAL_SNAPSHOT_REASON}")):
        await kvm("host1").create_system_snapshot(dom.name, "s1")
    assert await kvm("host1").system_snapshots(dom.name) == []


@real
async def test_system_snapshot_create_revert_delete(kvm, custom_domain, hypervisors) -> None:
    dom = custom_domain(vdb_qcow2=True)
    host1, hv = kvm("host1"), hypervisors("host1")
    await host1.create_system_snapshot(dom.name, "before", "taken running")
    assert await host1.system_snapshots(dom.name) == ["before"]
    hv.write_pattern(dom, "vda")
    await host1.revert_system_snapshot(dom.name, "before")
    assert await host1.state(dom.name) is DomainState.RUNNING  # taken running: reverts to running
    await host1.destroy(dom.name)
    assert not holds_pattern(dom.vda, "qcow2") and holds_pattern(dom.vda, "qcow2", 0)  # the write is gone
    await host1.delete_system_snapshot(dom.name, "before")
    assert await host1.system_snapshots(dom.name) == []
    with pytest.raises(VmmError, match=rf"^host1: domain '{dom.name}': revert system snapshot 'before': "):
        await host1.revert_system_snapshot(dom.name, "before")


@real
async def test_disk_snapshots_with_qemu_img_when_powered_off(kvm, tiny_domain) -> None:
    dom = tiny_domain()
    host1 = kvm("host1")
    with pytest.raises(OperationRefused, match=rf"^host1: domain '{dom.name}': create disk snapshot 's1' of vda: "
                                               r"refused: the VM is running; qemu-img"):
        await host1.create_disk_snapshot(dom.name, "vda", "s1")
    await host1.destroy(dom.name)
    with pytest.raises(OperationRefused, match="disk vdb is a raw file disk; internal disk snapshots need a qcow2"):
        await host1.create_disk_snapshot(dom.name, "vdb", "s1")
    await host1.create_disk_snapshot(dom.name, "vda", "s1")
    assert await host1.disk_snapshots(dom.name, "vda") == ["s1"]
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 8M 2M", str(dom.vda)])
    await host1.revert_disk_snapshot(dom.name, "vda", "s1")
    assert not holds_pattern(dom.vda, "qcow2")
    await host1.start(dom.name)
    with pytest.raises(OperationRefused, match="revert disk snapshot 's1' of vda: refused: the VM is running"):
        await host1.revert_disk_snapshot(dom.name, "vda", "s1")
    assert await host1.disk_snapshots(dom.name, "vda") == ["s1"]  # listing works while running
    await host1.destroy(dom.name)
    await host1.delete_disk_snapshot(dom.name, "vda", "s1")
    assert await host1.disk_snapshots(dom.name, "vda") == []
    with pytest.raises(VmmError, match="delete disk snapshot 'nope' of vda: .*qemu-img exited with 1"):
        await host1.delete_disk_snapshot(dom.name, "vda", "nope")


def ssh_children() -> set[int]:
    """PIDs of the ssh clients this process started (libvirt's qemu+ssh transport spawns one per connection)."""
    me, found = os.getpid(), set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm, rest = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
        if comm == "ssh" and int(rest[1]) == me:
            found.add(int(stat.parent.name))
    return found


@real
async def test_reconnects_after_the_transport_dies_and_keeps_delivering_events(realenv, tiny_domain) -> None:
    dom = tiny_domain("host2")
    before = ssh_children()
    host2 = KvmHost("host2", realenv.host("host2").libvirt_uri, call_timeout=30)
    changes: asyncio.Queue[StateChange] = asyncio.Queue()
    try:
        await host2.watch_states(changes.put_nowait)
        (transport,) = ssh_children() - before
        os.kill(transport, signal.SIGTERM)
        try:
            await host2.state(dom.name)  # may still see the dying connection: then it says so, retryable
        except VmmError as exc:
            assert exc.retryable, exc
        await host2.suspend(dom.name)
        async with asyncio.timeout(EVENT_WAIT):
            change = await changes.get()
        assert (change.name, change.state) == (dom.name, DomainState.PAUSED)
        assert transport not in ssh_children() and len(ssh_children() - before) == 1
    finally:
        await host2.close()


class _Vanishing:
    """Fault injection: a domain listed a moment ago and gone when read (a migration's source), or broken."""

    def __init__(self, code: int) -> None:
        self.code = code

    def name(self) -> str:
        error = libvirt.libvirtError("gone")
        error.err = (self.code, 0, "gone", 0, "", None, None, 0, 0)
        raise error


def test_a_domain_gone_while_listed_is_left_out_other_errors_are_not() -> None:
    assert kvm_module._info_unless_gone(_Vanishing(libvirt.VIR_ERR_NO_DOMAIN)) is None
    with pytest.raises(libvirt.libvirtError):
        kvm_module._info_unless_gone(_Vanishing(libvirt.VIR_ERR_INTERNAL_ERROR))
