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

import signal
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


def backup(api: Api, vm_id: int, ds_id: int) -> str:
    api.call("one.vm.backup", vm_id, ds_id, False)
    status = wait_done(api, vm_id)
    assert status["STATE"] == "done", (status, api.daemon.log()[-3000:])
    return str(status["MESSAGE"])


def chain_image(api: Api, vm_id: int) -> etree._Element:
    [image_id] = [int(i.text or "") for i in api.vm(vm_id).iterfind("BACKUPS/BACKUP_IDS/ID")]
    return etree.fromstring(str(api.call("one.image.info", image_id)).encode())


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
    plain = start_daemon(state, env.config())
    api = Api(plain, {})
    try:
        _, ds_id = register(api, env, env.base / f"inc-{point}")
        [result] = api.import_domains("host1", [dom.name])
        vm_id = int(result["ID"])
        api.call("one.vm.updateconf", vm_id, INCREMENT, 1)
        backup(api, vm_id, ds_id)  # the base
    finally:
        assert plain.stop() == 0
    host1.write_pattern(dom, "vda", pattern=0x5E, offset="12M", length="3M")
    then = snapshot_copy(dom.vda, tmp_path / "vda.then", "qcow2")

    first = start_daemon(state, env.config(), extra_env={"VMSCHED_CRASH_AT": point})
    api.daemon = first
    try:
        api.call("one.vm.backup", vm_id, ds_id, False)
        assert first.process.wait(timeout=90) == -signal.SIGKILL, first.log()[-3000:]
    finally:
        first.stop(signal.SIGKILL)
    assert f"crash point '{point}' reached" in first.log()
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
        image_ds = int(api.call("one.datastore.allocate",  # type: ignore[call-overload]
                                f'NAME = "imgs"\nTYPE = "IMAGE_DS"\nDS_MAD = "fs"\nBASE_PATH = "{tmp_path}/imgs"', -1))
        reply = str(api.call("one.image.restore", int(image.findtext("ID") or ""), image_ds,
                             'INCREMENT_ID = "1"\nDISK_ID = "0"\nNAME = "at-1"'))
        restored = etree.fromstring(str(api.call("one.image.info", int(reply.split()[1]))).encode())
        assert same_image(Path(restored.findtext("SOURCE") or ""), then)
        message = backup(api, vm_id, ds_id)  # and the chain goes on
        assert "increment 2" in message
    finally:
        assert second.stop() == 0, second.log()[-3000:]
    assert "Traceback" not in second.log()
