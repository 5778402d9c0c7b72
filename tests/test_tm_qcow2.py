"""drivers.tm.qcow2 on a real host: live and powered-off captures, the three FS_FREEZE modes, failures,
cancellation and recovery after a crash (libvirtd over qemu+ssh, commands through the SSH layer)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
import pytest
import pytest_asyncio

from drivers.commands import Result, Runner
from drivers.ssh import SshPool, SshSettings, SshTarget
from drivers.tm.plan import DiskSource, FsFreeze
from drivers.tm.qcow2 import CaptureOptions, CaptureRequest, CaptureResult, RecoveryReport, capture, recover
from drivers.vmm.errors import GuestAgentError
from drivers.vmm.kvm import KvmHost
from scheduler.errors import DriverError
from tests.realenv import agentguest, domains
from tests.realenv.agentguest import AgentGuest
from tests.realenv.domains import Hypervisor, TinyDomain
from tests.realenv.model import RealEnv
from tests.realenv.procs import run

REPO = Path(__file__).resolve().parents[1]
WAIT = 30.0  # seconds: anything awaited in these tests that takes longer is a failure
MiB = 1 << 20


def real(fn: Callable[..., object]) -> Callable[..., object]:
    return pytest.mark.realenv(pytest.mark.asyncio(loop_scope="module")(fn))


# ---------------------------------------------------------------------------------------------- helpers


@dataclass
class Host:
    kvm: KvmHost
    runner: Runner


def ssh_parts(env: RealEnv) -> dict[str, Any]:
    info = env.host("host1")
    return {"uri": info.libvirt_uri, "known_hosts": str(env.ssh.known_hosts), "key": str(env.ssh.client_key),
            "address": info.address, "port": info.ssh_port, "user": info.user}


def open_host(parts: dict[str, Any]) -> tuple[KvmHost, SshPool, Runner]:
    pool = SshPool(SshSettings(known_hosts=Path(parts["known_hosts"]), key=Path(parts["key"]), connect_timeout=5))
    runner = pool.runner(SshTarget(parts["address"], parts["port"], parts["user"]))
    return KvmHost("host1", parts["uri"], call_timeout=30), pool, runner


@asynccontextmanager
async def connected(realenv: RealEnv) -> AsyncIterator[Host]:
    """host1's libvirt connection and command runner, closed afterwards."""
    kvm, pool, runner = open_host(ssh_parts(realenv))
    try:
        yield Host(kvm, runner)
    finally:
        await kvm.close()
        await pool.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def host1(realenv: RealEnv) -> AsyncIterator[Host]:
    async with connected(realenv) as host:
        yield host


class Journal:
    """The run's sink: collects the journaled steps, process groups and progress reports; ``hooks[step]``
    runs once, when that step is first journaled."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self.hooks: dict[str, Callable[[], Awaitable[None]]] = {}
        self.groups: list[int] = []
        self.reports: list[tuple[int, int, int]] = []

    async def journal(self, entry: dict[str, Any]) -> None:
        self.steps.append(entry)
        hook = self.hooks.pop(entry["step"], None)
        if hook is not None:
            await hook()

    async def process_started(self, side: str, pgid: int) -> None:
        assert side == "source"
        self.groups.append(pgid)

    def disk_progress(self, disk_id: int, done: int, total: int) -> None:
        self.reports.append((disk_id, done, total))

    def files_progress(self, done: Mapping[str, int], total: Mapping[str, int]) -> None:
        raise AssertionError("a capture uploads nothing")

    def reached(self, point: str) -> None:
        return None

    def names(self) -> list[str]:
        return [s["step"] for s in self.steps]


async def captured(kvm: KvmHost, runner: Runner, domain: str, disks: list[DiskSource], *, fs_freeze: FsFreeze,
                   run_id: int | str, staging_dir: str, journal: Journal | None = None,
                   **request: Any) -> CaptureResult:
    """A whole capture whose block uploads nothing."""
    wanted = CaptureRequest(domain, disks, fs_freeze, run_id, staging_dir, **request)
    async with capture(kvm, runner, wanted, journal if journal is not None else Journal()) as result:
        return result


def tiny_disks(dom: TinyDomain) -> list[DiskSource]:
    return [DiskSource(0, "vda", str(dom.vda), "qcow2"), DiskSource(1, "vdb", str(dom.vdb), "raw")]


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".vmsched-" in p.name)


def staged(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def holds(image: Path | str, fmt: str, pattern: int, offset: str = "8M", length: str = "2M") -> bool:
    done = run(["qemu-io", "-r", "-U", "-f", fmt, "-c", f"read -P {pattern:#x} {offset} {length}", str(image)],
               check=False)
    return done.returncode == 0 and "verification failed" not in done.stdout + done.stderr


def image_info(path: Path | str) -> dict[str, Any]:
    return json.loads(run(["qemu-img", "info", "-U", "--output=json", str(path)]).stdout)


def copy_of(path: Path, fmt: str, target: Path) -> Path:
    run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "qcow2", str(path), str(target)])
    return target


def same_content(a: Path | str, b: Path | str) -> bool:
    return run(["qemu-img", "compare", "-U", str(a), str(b)], check=False).returncode == 0


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def persistent_sources(hv: Hypervisor, name: str) -> dict[str, Path]:
    return domains.disk_sources(hv.conn.lookupByName(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))


def assert_back_on_own_disks(hv: Hypervisor, name: str, disks: list[DiskSource], state: str = "running") -> None:
    expected = {d.target: Path(d.path) for d in disks}
    dom = hv.conn.lookupByName(name)
    assert {t: p for t, p in domains.disk_sources(dom.XMLDesc()).items() if t in expected} == expected
    assert {t: p for t, p in persistent_sources(hv, name).items() if t in expected} == expected
    assert domains.STATE_NAMES[dom.state()[0]] == state
    for disk in disks:
        assert leftovers(Path(disk.path).parent) == []


@pytest.fixture
def template_domain(hypervisors: Callable[[str], Hypervisor], tmp_path: Path) -> Iterator[Callable[[Path], TinyDomain]]:
    """A running tiny domain whose vda is a qcow2 overlay on ``template``."""
    made: list[TinyDomain] = []
    hv = hypervisors("host1")

    def make(template: Path) -> TinyDomain:
        name = domains.new_name()
        vda, vdb, _ = domains.make_disks(tmp_path / name)
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(template), "-F", "qcow2", str(vda)])
        dom = TinyDomain(name=name, host="host1", directory=vda.parent, vda=vda, vdb=vdb)
        hv.conn.defineXML(domains.domain_xml(name, vda, vdb))
        made.append(dom)
        hv.start(dom)
        return dom

    yield make
    for dom in made:
        hv.remove(dom)


async def write_after_snapshot(hv: Hypervisor, dom: TinyDomain, targets: tuple[str, ...]) -> None:
    for target in targets:
        await asyncio.to_thread(hv.write_pattern, dom, target, pattern=0xA5)


# ---------------------------------------------------------------------------------------------- live and cold


LIVE_STEPS = {
    FsFreeze.NONE: ["overlay", "overlay", "staging", "staging", "committed", "committed"],
    FsFreeze.SUSPEND: ["overlay", "overlay", "suspended", "resumed", "staging", "staging", "committed", "committed"],
}


@pytest.mark.parametrize("mode", [FsFreeze.NONE, FsFreeze.SUSPEND])
@real
async def test_live_capture_is_the_disk_at_the_snapshot(host1, tiny_domain, hypervisors, tmp_path, mode) -> None:
    dom, hv = tiny_domain(), hypervisors("host1")
    hv.write_pattern(dom, "vda", pattern=0x5A)
    hv.write_pattern(dom, "vdb", pattern=0x3C)
    before = {"vda": copy_of(dom.vda, "qcow2", tmp_path / "vda.before"),
              "vdb": copy_of(dom.vdb, "raw", tmp_path / "vdb.before")}
    journal = Journal()
    journal.hooks["staging"] = lambda: write_after_snapshot(hv, dom, ("vda", "vdb"))  # the guest writes on
    stage = tmp_path / "base" / "42" / "17"
    result = await captured(host1.kvm, host1.runner, dom.name, tiny_disks(dom), fs_freeze=mode, run_id=17,
                           staging_dir=str(stage), journal=journal, nice=10, ionice=7)
    assert journal.names() == LIVE_STEPS[mode]
    assert all(s["run"] == "17" and s["tm"] == "qcow2" for s in journal.steps)
    assert {s["path"] for s in journal.steps if s["step"] == "overlay"} == {
        f"{dom.vda}.vmsched-17.overlay", f"{dom.vdb}.vmsched-17.overlay"}
    assert result.live and result.frozen_filesystems is None and 0 < result.snapshot_seconds < 5
    assert [(i.disk_id, i.target, i.path, i.virtual_size) for i in result.images] == [
        (0, "vda", str(stage / "disk.0.0"), 64 * MiB), (1, "vdb", str(stage / "disk.1.0"), 32 * MiB)]
    for image, target in zip(result.images, ("vda", "vdb"), strict=True):
        info = image_info(image.path)
        assert info["format"] == "qcow2" and "backing-filename" not in info
        assert 2 * MiB <= image.actual_size < 8 * MiB  # sparse: the 2 MiB written and metadata
        assert same_content(image.path, before[target])
        assert not holds(image.path, "qcow2", 0xA5)
    assert holds(dom.vda, "qcow2", 0xA5) and holds(dom.vdb, "raw", 0xA5)  # the later writes were committed back
    assert_back_on_own_disks(hv, dom.name, tiny_disks(dom))
    assert staged(stage) == ["disk.0.0", "disk.1.0"]


@real
async def test_then_runs_on_the_staged_files_while_the_overlays_are_committed(host1, tiny_domain, hypervisors,
                                                                              tmp_path) -> None:
    dom, hv = tiny_domain(), hypervisors("host1")
    hv.write_pattern(dom, "vda", pattern=0x5A)
    stage = tmp_path / "base" / "42" / "18"
    journal = Journal()
    groups, reports = journal.groups, journal.reports
    seen: dict[str, object] = {}

    request = CaptureRequest(dom.name, tiny_disks(dom), FsFreeze.NONE, 18, str(stage), progress=True)
    async with capture(host1.kvm, host1.runner, request, journal):
        seen["staged"] = staged(stage)
        seen["committed_before"] = journal.names().count("committed")
    assert seen == {"staged": ["disk.0.0", "disk.1.0"], "committed_before": 0}  # not waiting for the commits
    assert journal.names().count("committed") == 2
    assert_back_on_own_disks(hv, dom.name, tiny_disks(dom))
    assert len(groups) == 2 and all(g > 1 for g in groups)  # each convert's process group
    finals = {disk: (done, total) for disk, done, total in reports}
    assert finals[0][0] == finals[0][1] >= 2 * MiB  # vda's chain holds the 2 MiB written
    assert {disk for disk, _, _ in reports} == {0, 1} and reports[0][1] == 0


@real
async def test_a_failing_then_fails_the_capture_and_leaves_nothing(host1, tiny_domain, hypervisors,
                                                                  tmp_path) -> None:
    dom, hv = tiny_domain(), hypervisors("host1")
    stage = tmp_path / "base" / "42" / "19"

    request = CaptureRequest(dom.name, tiny_disks(dom), FsFreeze.SUSPEND, 19, str(stage))
    with pytest.raises(RuntimeError, match="went away"):
        async with capture(host1.kvm, host1.runner, request, Journal()):
            raise RuntimeError("the backup server went away")
    assert staged(stage) == []
    assert_back_on_own_disks(hv, dom.name, tiny_disks(dom))
    assert hv.state(dom) == "running"


@real
async def test_commit_lands_in_vda_and_the_template_is_untouched(host1, template_domain, hypervisors,
                                                                 tmp_path) -> None:
    template = tmp_path / "template.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(template), "64M"])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", str(template)])
    template_sha = sha256(template)
    dom, hv = template_domain(template), hypervisors("host1")
    hv.write_pattern(dom, "vda", pattern=0x5A)
    journal = Journal()
    journal.hooks["staging"] = lambda: write_after_snapshot(hv, dom, ("vda",))
    stage = tmp_path / "base" / "3" / "run-9"
    disks = [DiskSource(0, "vda", str(dom.vda), "qcow2")]
    result = await captured(host1.kvm, host1.runner, dom.name, disks, fs_freeze=FsFreeze.NONE, run_id="run-9",
                           staging_dir=str(stage), journal=journal)
    backup = result.images[0].path
    assert "backing-filename" not in image_info(backup)  # flattened: the template's data is in the backup
    assert holds(backup, "qcow2", 0x11, "0", "1M") and holds(backup, "qcow2", 0x5A) and not holds(backup, "qcow2", 0xA5)
    assert holds(dom.vda, "qcow2", 0xA5)
    assert image_info(dom.vda)["backing-filename"] == str(template)
    assert sha256(template) == template_sha
    assert_back_on_own_disks(hv, dom.name, disks)


@real
async def test_a_paused_vm_is_captured_without_quiescing_and_stays_paused(host1, tiny_domain, hypervisors,
                                                                          tmp_path) -> None:
    dom, hv = tiny_domain(), hypervisors("host1")
    hv.lookup(dom).suspend()
    journal = Journal()
    result = await captured(host1.kvm, host1.runner, dom.name, tiny_disks(dom), fs_freeze=FsFreeze.SUSPEND,
                           run_id=12, staging_dir=str(tmp_path / "b" / "1" / "12"), journal=journal)
    assert result.live and journal.names() == LIVE_STEPS[FsFreeze.NONE]
    assert_back_on_own_disks(hv, dom.name, tiny_disks(dom), state="paused")


@real
async def test_powered_off_capture_converts_the_disks_directly(host1, tiny_domain, hypervisors, tmp_path) -> None:
    dom, hv = tiny_domain(start=False), hypervisors("host1")
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5A 8M 2M", str(dom.vda)])
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x3C 1M 1M", str(dom.vdb)])
    journal = Journal()
    stage = tmp_path / "base" / "5" / "8"
    result = await captured(host1.kvm, host1.runner, dom.name, tiny_disks(dom), fs_freeze=FsFreeze.SUSPEND, run_id=8,
                           staging_dir=str(stage), journal=journal)
    assert not result.live and journal.names() == ["staging", "staging"]
    assert same_content(result.images[0].path, dom.vda) and same_content(result.images[1].path, dom.vdb)
    assert holds(result.images[1].path, "qcow2", 0x3C, "1M", "1M")
    assert_back_on_own_disks(hv, dom.name, tiny_disks(dom), state="shutoff")


# ---------------------------------------------------------------------------------------------- failures


@real
async def test_agent_mode_without_an_agent_is_a_clear_error_and_does_nothing(host1, tiny_domain, hypervisors,
                                                                            tmp_path) -> None:
    dom, hv = tiny_domain(), hypervisors("host1")
    journal = Journal()
    stage = tmp_path / "base" / "1" / "2"
    with pytest.raises(GuestAgentError, match=r"fsfreeze: .*not connected; FS_FREEZE=AGENT needs a running QEMU "
                                              r"guest agent in the VM; nothing was snapshotted"):
        await captured(host1.kvm, host1.runner, dom.name, tiny_disks(dom), fs_freeze=FsFreeze.AGENT, run_id=2,
                      staging_dir=str(stage), journal=journal)
    assert journal.names() == ["overlay", "overlay", "frozen"]
    assert not stage.exists()
    assert_back_on_own_disks(hv, dom.name, tiny_disks(dom))


@real
async def test_a_disk_moved_since_the_request_is_refused(host1, tiny_domain, tmp_path) -> None:
    dom = tiny_domain()
    moved = [DiskSource(0, "vda", str(dom.directory / "other.qcow2"), "qcow2")]
    journal = Journal()
    with pytest.raises(DriverError, match=rf"^host1: domain '{dom.name}': run 4: disk 0 \(vda\) runs on {dom.vda}"):
        await captured(host1.kvm, host1.runner, dom.name, moved, fs_freeze=FsFreeze.NONE, run_id=4,
                      staging_dir=str(tmp_path / "4"), journal=journal)
    assert journal.steps == []


class ConvertWatcher:
    """The real runner, telling when ``qemu-img convert`` starts and how its run ended."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.started = asyncio.Event()
        self.outcome: str | None = None

    async def run(self, argv: list[str], **kwargs: Any) -> Result:
        if argv[:2] != ["qemu-img", "convert"]:
            return await self.runner.run(argv, **kwargs)
        self.started.set()
        try:
            result = await self.runner.run(argv, **kwargs)
        except asyncio.CancelledError:
            self.outcome = "cancelled"
            raise
        self.outcome = "finished"
        return result


@real
async def test_cancelled_during_convert_leaves_nothing(host1, tiny_domain, hypervisors, tmp_path) -> None:
    dom, hv = tiny_domain(), hypervisors("host1")
    hv.write_pattern(dom, "vda", length="4M")
    stage = tmp_path / "base" / "6" / "31"
    watcher = ConvertWatcher(host1.runner)
    disks = tiny_disks(dom)[:1]
    task = asyncio.create_task(captured(host1.kvm, watcher, dom.name, disks, fs_freeze=FsFreeze.SUSPEND, run_id=31,
                                       staging_dir=str(stage), journal=Journal(),
                                       options=CaptureOptions(rate_limit=1024 * 1024)))  # 4 MiB at 1 MiB/s
    async with asyncio.timeout(WAIT):
        await watcher.started.wait()
        while not (stage / "disk.0.0").exists():  # noqa: ASYNC110 - no event says qemu-img opened its output
            await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(WAIT):
            await task
    assert watcher.outcome == "cancelled"
    assert staged(stage) == []
    pattern = f"qemu-img conver[t] .*{stage}"  # the [t] keeps pgrep's own parents from matching
    busy = await host1.runner.run(["pgrep", "-f", pattern], timeout=WAIT, check=False)
    assert busy.exit_status == 1, busy.stdout  # the remote qemu-img was killed
    assert_back_on_own_disks(hv, dom.name, disks)


# ---------------------------------------------------------------------------------------------- the agent guest


def agent_disks(guest: AgentGuest) -> list[DiskSource]:
    return [DiskSource(0, "vda", str(guest.disks[0]), "qcow2")]


@real
async def test_agent_freeze_captures_a_clean_filesystem(host1, agent_guest, hypervisors, tmp_path) -> None:
    data = os.urandom(64 * 1024)
    agent_guest.write_file("/mnt/vda/before.bin", data)
    journal = Journal()
    result = await captured(host1.kvm, host1.runner, agent_guest.name, agent_disks(agent_guest),
                           fs_freeze=FsFreeze.AGENT, run_id=51, staging_dir=str(tmp_path / "b" / "7" / "51"),
                           journal=journal)
    assert journal.names() == ["overlay", "frozen", "thawed", "staging", "committed"]
    assert (result.frozen_filesystems, result.thawed_first) == (1, 0)
    assert agent_guest.fsfreeze_status() == "thawed"
    backup = Path(result.images[0].path)
    assert agentguest.DISK_LABEL in agentguest.check_filesystem(backup, tmp_path)  # e2fsck -fn: clean
    assert agentguest.read_disk_file(backup, "/before.bin", tmp_path) == data
    assert_back_on_own_disks(hypervisors("host1"), agent_guest.name, agent_disks(agent_guest))
    agent_guest.write_file("/mnt/vda/after.bin", b"after")  # the guest writes on its own disk again


@real
async def test_agent_guest_is_thawed_and_back_when_the_copy_fails(host1, agent_guest, hypervisors, tmp_path) -> None:
    (tmp_path / "not-a-dir").write_text("")
    stage = tmp_path / "not-a-dir" / "7" / "52"
    journal = Journal()
    with pytest.raises(DriverError, match="mkdir"):
        await captured(host1.kvm, host1.runner, agent_guest.name, agent_disks(agent_guest), fs_freeze=FsFreeze.AGENT,
                      run_id=52, staging_dir=str(stage), journal=journal)
    assert journal.names() == ["overlay", "frozen", "thawed", "committed"]
    assert agent_guest.fsfreeze_status() == "thawed"
    assert_back_on_own_disks(hypervisors("host1"), agent_guest.name, agent_disks(agent_guest))


@real
async def test_a_guest_left_frozen_is_thawed_first(host1, agent_guest, tmp_path) -> None:
    assert agent_guest.dom.fsFreeze() == 1  # what a crashed run would leave
    result = await captured(host1.kvm, host1.runner, agent_guest.name, agent_disks(agent_guest),
                           fs_freeze=FsFreeze.AGENT, run_id=53, staging_dir=str(tmp_path / "b" / "7" / "53"),
                           journal=Journal())
    assert (result.thawed_first, result.frozen_filesystems) == (1, 1)
    assert agent_guest.fsfreeze_status() == "thawed"
    assert agentguest.DISK_LABEL in agentguest.check_filesystem(Path(result.images[0].path), tmp_path)


# ---------------------------------------------------------------------------------------------- crash recovery


class _StallAfterSnapshot(KvmHost):
    """Takes the snapshot, says so on stdout, then hangs: the process is killed before any cleanup."""

    async def snapshot_disks(self, *args: Any, **kwargs: Any) -> None:
        await super().snapshot_disks(*args, **kwargs)
        print("snapshotted", flush=True)
        await asyncio.Event().wait()


def crash_child() -> None:
    """Entry point of the capture that gets killed: argv[1] is a JSON job, steps go to a JSON-lines file."""
    job = json.loads(sys.argv[1])

    def append(entry: dict[str, Any]) -> None:
        with open(job["journal"], "a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())

    class FileJournal(Journal):
        async def journal(self, entry: dict[str, Any]) -> None:
            append(entry)  # blocking on purpose: the step is on disk before the artifact exists

    async def main() -> None:
        _, _, runner = open_host(job["host"])
        kvm = _StallAfterSnapshot("host1", job["host"]["uri"], call_timeout=30)
        disks = [DiskSource(**d) for d in job["disks"]]
        await captured(kvm, runner, job["domain"], disks, fs_freeze=FsFreeze(job["mode"]), run_id=job["run"],
                      staging_dir=job["staging"], journal=FileJournal())

    asyncio.run(main())


async def crash_after_snapshot(realenv: RealEnv, domain: str, disks: list[DiskSource], mode: FsFreeze,
                               tmp_path: Path) -> list[dict[str, Any]]:
    """Run a capture in a child process, kill -9 it once the snapshot is taken; the journaled steps."""
    steps_file = tmp_path / "journal.jsonl"
    job = {"host": ssh_parts(realenv), "domain": domain, "disks": [d.__dict__ for d in disks], "mode": mode.value,
           "run": "77", "staging": str(tmp_path / "b" / "77"), "journal": str(steps_file)}
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from tests.test_tm_qcow2 import crash_child; crash_child()", json.dumps(job),
        stdout=asyncio.subprocess.PIPE, cwd=REPO)
    try:
        async with asyncio.timeout(WAIT):
            assert await child.stdout.readline() == b"snapshotted\n"
    finally:
        child.send_signal(signal.SIGKILL)
        await child.wait()
    return [json.loads(line) for line in steps_file.read_text().splitlines()]


@real
async def test_recover_after_a_crash_while_suspended(host1, realenv, tiny_domain, hypervisors, tmp_path) -> None:
    dom, hv = tiny_domain(), hypervisors("host1")
    disks = tiny_disks(dom)
    steps = await crash_after_snapshot(realenv, dom.name, disks, FsFreeze.SUSPEND, tmp_path)
    assert [s["step"] for s in steps] == ["overlay", "overlay", "suspended"]
    overlays = {s["target"]: Path(s["path"]) for s in steps if s["step"] == "overlay"}
    assert hv.state(dom) == "paused" and hv.disk_sources(dom) == overlays  # what the crash left
    hv.write_pattern(dom, "vdb", pattern=0xA5)  # (qemu-io writes even while paused) data only in the overlay
    foreign = {"tm": "qcow2", "step": "staging", "run": "77", "path": str(dom.vdb)}  # not a name of ours
    report = await recover(host1.kvm, host1.runner, dom.name, [*steps, foreign])
    assert report.resumed and not report.thawed and sorted(report.committed) == ["vda", "vdb"]
    assert sorted(report.removed) == sorted(str(p) for p in overlays.values())
    assert report.refused == [str(dom.vdb)] and dom.vdb.exists()
    assert holds(dom.vdb, "raw", 0xA5)
    assert_back_on_own_disks(hv, dom.name, disks)
    assert await recover(host1.kvm, host1.runner, dom.name, steps) == RecoveryReport()  # again: nothing to undo


@real
async def test_recover_after_a_crash_while_frozen(host1, realenv, agent_guest, hypervisors, tmp_path) -> None:
    disks = agent_disks(agent_guest)
    steps = await crash_after_snapshot(realenv, agent_guest.name, disks, FsFreeze.AGENT, tmp_path)
    assert [s["step"] for s in steps] == ["overlay", "frozen"]
    assert agent_guest.fsfreeze_status() == "frozen"
    report = await recover(host1.kvm, host1.runner, agent_guest.name, steps)
    assert report.thawed and not report.resumed and report.committed == ["vda"]
    assert agent_guest.fsfreeze_status() == "thawed"
    assert_back_on_own_disks(hypervisors("host1"), agent_guest.name, disks)
