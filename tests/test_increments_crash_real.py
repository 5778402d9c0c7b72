"""kill -9 of the daemon during an increment, or while KEEP_LAST merges the oldest increments of a chain,
then a restart.

During increment 1 the daemon dies once the backup job started with its checkpoint (``snapshot``), once
the increment is staged (``converted``), or once it is uploaded but not recorded (``uploaded``). The restarted
daemon aborts the job QEMU still runs, removes the checkpoint and what was staged or uploaded, and retries:
the chain then has links 0 and 1, exactly checkpoints 0 and 1, and link 1 is the disk at the retry.

The daemon kills itself (``VMSCHED_CRASH_AT``, test-only) once the merged backup is written but not
recorded (``flatten-merged``), or once it is recorded but the merged links' backups are not removed yet
(``flatten-switched``). The restarted daemon must, before it listens, leave a chain every increment of which
restores, with exactly its recorded backups on the server, the image READY and the VM free to back up again;
the next increment then flattens as usual.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from lxml import etree

from tests.conftest import start_daemon
from tests.realenv.domains import Hypervisor, TinyDomain
from tests.test_backup_crash_real import Env, env, register, wait_done  # noqa: F401 - env is a fixture
from tests.test_backup_real import same_image, snapshot_copy
from tests.test_import_real import Api
from tests.test_increments_real import increments

pytestmark = pytest.mark.realenv
KEEP_TWO = 'BACKUP_CONFIG = [ MODE = "INCREMENT", KEEP_LAST = "2" ]'
INCREMENT = 'BACKUP_CONFIG = [ MODE = "INCREMENT" ]'
SNAPSHOT = 'BACKUP_CONFIG = [ MODE = "INCREMENT", INCREMENT_MODE = "SNAPSHOT" ]'


def backup(api: Api, vm_id: int, ds_id: int) -> str:
    api.call("one.vm.backup", vm_id, ds_id, False)
    status = wait_done(api, vm_id)
    assert status["STATE"] == "done", (status, api.daemon.log()[-3000:])
    return str(status["MESSAGE"])


def chain_image(api: Api, vm_id: int) -> etree._Element:
    [image_id] = [int(i.text or "") for i in api.vm(vm_id).iterfind("BACKUPS/BACKUP_IDS/ID")]
    return etree.fromstring(str(api.call("one.image.info", image_id)).encode())


def with_a_base(env: Env, state: Path, dom: TinyDomain, datastore: str,  # noqa: F811
                config: str) -> tuple[Api, int, int]:
    """A daemon (stopped again) that registered ``dom`` with ``config`` and took its chain's base; (api, VM id,
    datastore id)."""
    plain = start_daemon(state, env.config())
    api = Api(plain, {})
    try:
        _, ds_id = register(api, env, env.base / datastore)
        [result] = api.import_domains("host1", [dom.name])
        vm_id = int(result["ID"])
        api.call("one.vm.updateconf", vm_id, config, 1)
        backup(api, vm_id, ds_id)
    finally:
        assert plain.stop() == 0
    return api, vm_id, ds_id


def killed_at(api: Api, env: Env, state: Path, point: str, vm_id: int, ds_id: int) -> None:  # noqa: F811
    """A daemon that kills itself at ``point`` of the VM's next backup."""
    first = start_daemon(state, env.config(), extra_env={"VMSCHED_CRASH_AT": point})
    api.daemon = first
    try:
        api.call("one.vm.backup", vm_id, ds_id, False)
        assert first.process.wait(timeout=90) == -signal.SIGKILL, first.log()[-3000:]
    finally:
        first.stop(signal.SIGKILL)
    assert f"crash point '{point}' reached" in first.log()


def restores_to(api: Api, image: etree._Element, increment: int, then: Path, tmp_path: Path) -> None:
    """Disk 0 of the chain at ``increment`` restores (one.image.restore) to ``then``."""
    image_ds = int(api.call("one.datastore.allocate",  # type: ignore[call-overload]
                            f'NAME = "imgs"\nTYPE = "IMAGE_DS"\nDS_MAD = "fs"\nBASE_PATH = "{tmp_path}/imgs"', -1))
    reply = str(api.call("one.image.restore", int(image.findtext("ID") or ""), image_ds,
                         f'INCREMENT_ID = "{increment}"\nDISK_ID = "0"\nNAME = "at-{increment}"'))
    restored = etree.fromstring(str(api.call("one.image.info", int(reply.split()[1]))).encode())
    assert same_image(Path(restored.findtext("SOURCE") or ""), then)


@pytest.mark.parametrize(("point", "links_after"), [("flatten-merged", [0, 1, 2]), ("flatten-switched", [1, 2])])
def test_kill_9_during_a_flatten_then_restart(env: Env, point: str, links_after: list[int], tmp_path: Path,  # noqa: F811
                                              tiny_domain: Callable[..., TinyDomain],
                                              hypervisors: Callable[[str], Hypervisor]) -> None:
    host1 = hypervisors("host1")
    dom = tiny_domain("host1", vdb_format="qcow2")
    state = tmp_path / "state"
    first = start_daemon(state, env.config(), extra_env={"VMSCHED_CRASH_AT": point})
    api = Api(first, {})
    at: dict[int, Path] = {}
    try:
        _, ds_id = register(api, env, env.base / point)
        [result] = api.import_domains("host1", [dom.name])
        vm_id = int(result["ID"])
        api.call("one.vm.updateconf", vm_id, KEEP_TWO, 1)
        for n in range(3):
            host1.write_pattern(dom, "vda", pattern=0x30 + n, offset=f"{8 * n}M", length="1M")
            at[n] = snapshot_copy(dom.vda, tmp_path / f"vda.{n}", "qcow2")
            if n < 2:
                backup(api, vm_id, ds_id)
        api.call("one.vm.backup", vm_id, ds_id, False)  # increment 2, then the merge of 0 and 1
        assert first.process.wait(timeout=90) == -signal.SIGKILL, first.log()[-3000:]
    finally:
        first.stop(signal.SIGKILL)
    assert f"crash point '{point}' reached" in first.log()
    vm_dir = env.base / point / str(vm_id)
    assert len(list(vm_dir.iterdir())) == 4  # three links and the merged backup

    second = start_daemon(state, env.config())  # listens once start-up recovery is done
    api.daemon = second
    try:
        image = chain_image(api, vm_id)
        links = increments(image)
        assert [i[0] for i in links] == links_after
        assert image.findtext("STATE") == "1" and image.find("TEMPLATE/FLATTEN") is None
        assert sorted(p.name for p in vm_dir.iterdir()) == sorted(source for *_, source, _ in links)
        image_ds = int(api.call("one.datastore.allocate",  # type: ignore[call-overload]
                                f'NAME = "imgs"\nTYPE = "IMAGE_DS"\nDS_MAD = "fs"\nBASE_PATH = "{tmp_path}/imgs"', -1))
        for n in links_after:  # every increment left restores to the disk as it was
            reply = str(api.call("one.image.restore", int(image.findtext("ID") or ""), image_ds,
                                 f'INCREMENT_ID = "{n}"\nDISK_ID = "0"\nNAME = "at-{n}"'))
            restored = etree.fromstring(str(api.call("one.image.info", int(reply.split()[1]))).encode())
            assert same_image(Path(restored.findtext("SOURCE") or ""), at[n]), f"increment {n}"

        message = backup(api, vm_id, ds_id)  # ACTIVE_FLATTEN is gone: the VM backs up, and flattens again
        assert "increment 3" in message and "KEEP_LAST merged increments" in message, message
        assert [i[0] for i in increments(chain_image(api, vm_id))] == [2, 3]
        assert len(list(vm_dir.iterdir())) == 2
    finally:
        assert second.stop() == 0, second.log()[-3000:]
    assert "Traceback" not in second.log()


@pytest.mark.parametrize("point", ["snapshot", "converted", "uploaded"])
def test_kill_9_during_an_increment_then_restart(env: Env, point: str, tmp_path: Path,  # noqa: F811
                                                 tiny_domain: Callable[..., TinyDomain],
                                                 hypervisors: Callable[[str], Hypervisor]) -> None:
    host1 = hypervisors("host1")
    dom = tiny_domain("host1", vdb_format="qcow2")
    state = tmp_path / "state"
    api, vm_id, ds_id = with_a_base(env, state, dom, f"inc-{point}", INCREMENT)
    host1.write_pattern(dom, "vda", pattern=0x5E, offset="12M", length="3M")
    then = snapshot_copy(dom.vda, tmp_path / "vda.then", "qcow2")
    killed_at(api, env, state, point, vm_id, ds_id)
    assert f"vmsched-{vm_id}-1" in host1.checkpoints(dom)  # the dead run's checkpoint is there

    second = start_daemon(state, env.config())
    api.daemon = second
    try:
        status = wait_done(api, vm_id)  # the interrupted increment, retried
        assert status["STATE"] == "done" and "increment 1" in str(status["MESSAGE"]), (status, second.log()[-3000:])
        image = chain_image(api, vm_id)
        links = increments(image)
        assert [(i, t) for i, t, *_ in links] == [(0, "FULL"), (1, "INCREMENT")]
        vm_dir = env.base / f"inc-{point}" / str(vm_id)
        assert sorted(p.name for p in vm_dir.iterdir()) == sorted(source for *_, source, _ in links)
        assert host1.checkpoints(dom) == [f"vmsched-{vm_id}-0", f"vmsched-{vm_id}-1"]
        assert host1.state(dom) == "running" and host1.disk_sources(dom) == {"vda": dom.vda, "vdb": dom.vdb}
        assert not host1.lookup(dom).jobInfo()[0]  # no backup job left running
        restores_to(api, image, 1, then, tmp_path)
        message = backup(api, vm_id, ds_id)  # and the chain goes on
        assert "increment 2" in message
    finally:
        assert second.stop() == 0, second.log()[-3000:]
    assert "Traceback" not in second.log()


@pytest.mark.parametrize(("point", "retried"), [("snapshot", True), ("uploaded", True), ("recorded", False)])
def test_kill_9_during_a_snapshot_increment_then_restart(env: Env, point: str, retried: bool,  # noqa: F811
                                                         tmp_path: Path, tiny_domain: Callable[..., TinyDomain],
                                                         hypervisors: Callable[[str], Hypervisor]) -> None:
    """INCREMENT_MODE=SNAPSHOT, increment 1: the daemon dies once overlay 2 is on top (``snapshot``), once the
    copy of overlay 1 is uploaded but not recorded (``uploaded``), or once it is recorded but overlay 1 is not
    committed into the disks yet (``recorded``). After the restart the domain runs on ``[overlay 2, disk]``
    when increment 1 is in the chain (retried, or recorded before the crash) and every link restores."""
    host1 = hypervisors("host1")
    dom = tiny_domain("host1", vdb_format="qcow2")
    state = tmp_path / "state"
    api, vm_id, ds_id = with_a_base(env, state, dom, f"snap-{point}", SNAPSHOT)  # the VM runs on overlay 1
    on = {n: {"vda": Path(f"{dom.vda}.vmsched-snap.{vm_id}.{n}"), "vdb": Path(f"{dom.vdb}.vmsched-snap.{vm_id}.{n}")}
          for n in (1, 2)}
    assert host1.disk_sources(dom) == on[1]
    host1.write_pattern(dom, "vda", pattern=0x6E, offset="12M", length="3M")
    then = snapshot_copy(on[1]["vda"], tmp_path / "vda.then", "qcow2")

    killed_at(api, env, state, point, vm_id, ds_id)
    assert host1.disk_sources(dom) == on[2]  # the dead run's overlay is on top

    second = start_daemon(state, env.config())
    api.daemon = second
    try:
        if retried:
            status = wait_done(api, vm_id)
            assert status["STATE"] == "done" and "increment 1" in str(status["MESSAGE"]), (status, second.log()[-3000:])
        image = chain_image(api, vm_id)
        links = increments(image)
        assert [(i, t) for i, t, *_ in links] == [(0, "FULL"), (1, "INCREMENT")]
        vm_dir = env.base / f"snap-{point}" / str(vm_id)
        assert sorted(p.name for p in vm_dir.iterdir()) == sorted(source for *_, source, _ in links)
        assert host1.state(dom) == "running" and host1.disk_sources(dom) == on[2]
        restores_to(api, image, 1, then, tmp_path)
        host1.write_pattern(dom, "vda", pattern=0x6F, offset="40M", length="1M")
        later = snapshot_copy(on[2]["vda"], tmp_path / "vda.later", "qcow2")
        assert "increment 2" in backup(api, vm_id, ds_id)  # the chain goes on, on [overlay 3, disk]
        overlay_3 = Path(f"{dom.vda}.vmsched-snap.{vm_id}.3")
        assert host1.disk_sources(dom)["vda"] == overlay_3
        assert chain_files(overlay_3) == [str(overlay_3), str(dom.vda)]
        assert same_image(dom.vda, later)
        assert sorted(p.name for p in dom.directory.glob("*vmsched*")) == sorted(
            f"{disk.name}.vmsched-snap.{vm_id}.3" for disk in (dom.vda, dom.vdb))
    finally:
        assert second.stop() == 0, second.log()[-3000:]
    assert "Traceback" not in second.log()


def chain_files(path: Path) -> list[str]:
    out = subprocess.run(["qemu-img", "info", "-U", "--backing-chain", "--output=json", str(path)],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    return [str(info["filename"]) for info in json.loads(out)]
