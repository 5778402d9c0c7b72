"""MODE=INCREMENT end to end against the real environment: a daemon backs up a running TCG domain (two qcow2
disks) into fs, rsync and restic datastores, and each backup adds one link to the VM's chain image.

What each link must hold comes from outside the code under test: a ``qemu-img convert`` copy of the disk taken
just before each backup. The links are read back from the datastore by hand (the files of fs and rsync, a
``restic dump`` on the backup server), put in one directory where each finds its predecessor by name, and
compared with ``qemu-img compare``.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from lxml import etree

from tests.realenv.domains import Hypervisor, TinyDomain
from tests.realenv.model import RealEnv
from tests.test_backup_crash_real import wait_done
from tests.test_backup_real import same_image, snapshot_copy
from tests.test_download_verify_real import http_get, vmsched
from tests.test_import_real import Api, real_daemon, staged_state
from tests.test_restic_backup_real import PASSWORD, restic_on_server
from tests.test_restore_real import wait_run
from tests.xsd import validate

pytestmark = pytest.mark.realenv
MiB = 1 << 20
INCREMENT = 'BACKUP_CONFIG = [ MODE = "INCREMENT" ]'


@dataclass
class Chains:
    api: Api
    realenv: RealEnv
    datastores: dict[str, int]
    bases: dict[str, Path]
    images_ds: int

    def image(self, image_id: int) -> etree._Element:
        return etree.fromstring(str(self.api.call("one.image.info", image_id)).encode())

    def pointers(self, vm_id: int) -> tuple[int, int]:
        config = self.api.vm(vm_id).find("BACKUPS/BACKUP_CONFIG")
        assert config is not None
        return int(config.findtext("INCREMENTAL_BACKUP_ID") or "-9"), int(config.findtext("LAST_INCREMENT_ID") or "-9")

    def backup(self, vm_id: int, kind: str, reset: bool = False) -> str:
        """One backup through ``one.vm.backup``; the run's message."""
        self.api.call("one.vm.backup", vm_id, self.datastores[kind], reset)
        status = wait_done(self.api, vm_id)
        assert status["STATE"] == "done", f"{status}\n{self.api.daemon.log()[-3000:]}"
        return str(status["MESSAGE"])

    def fetch_link(self, kind: str, vm_id: int, source: str, name: str, into: Path) -> Path:
        """File ``name`` of backup ``source`` copied out of the datastore by hand, into ``into``."""
        target = into / name
        if kind == "restic":
            repo = self.bases[kind] / str(vm_id)
            [found] = json.loads(restic_on_server(self.realenv, repo, "snapshots", "--json", "--tag",
                                                         f"vmsched-backup-{source}"))
            assert "vmsched-flat" in found["tags"] and any(str(p).endswith(f"/{name}") for p in found["paths"])
            target.write_bytes(restic_on_server(self.realenv, repo, "dump", str(found["id"]), f"/{name}"))
        else:
            shutil.copyfile(self.bases[kind] / str(vm_id) / source / name, target)
        return target


@pytest.fixture(scope="module")
def chains(realenv: RealEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chains]:
    marker = f"vmsched-inctest-{secrets.token_hex(5)}"
    state = staged_state(realenv, tmp_path_factory, f"/var/tmp/{marker}")
    backup = realenv.backup
    bases = {"fs": tmp_path_factory.mktemp("fsds"), "rsync": backup.data_dir / f"{marker}-rsync",
             "restic": backup.data_dir / f"{marker}-restic"}
    texts = {
        "fs": f'NAME = "fsinc"\nTYPE = "BACKUP_DS"\nDS_MAD = "fs"\nBASE_PATH = "{bases["fs"]}"',
        "rsync": (f'NAME = "rsyncinc"\nTYPE = "BACKUP_DS"\nDS_MAD = "rsync"\nBASE_PATH = "{bases["rsync"]}"\n'
                  f'RSYNC_HOST = "{backup.address}"\nRSYNC_USER = "{backup.user}"\nRSYNC_PORT = "{backup.ssh_port}"'),
        "restic": (f'NAME = "resticinc"\nTYPE = "BACKUP_DS"\nDS_MAD = "restic"\nBASE_PATH = "{bases["restic"]}"\n'
                   f'RESTIC_SFTP_SERVER = "{backup.address}"\nRESTIC_SFTP_USER = "{backup.user}"\n'
                   f'RESTIC_SFTP_PORT = "{backup.ssh_port}"\nRESTIC_PASSWORD = "{PASSWORD}"'),
    }
    for api in real_daemon(realenv, state):
        datastores = {kind: int(api.call("one.datastore.allocate", text, -1))  # type: ignore[call-overload]
                      for kind, text in texts.items()}
        images = tmp_path_factory.mktemp("images")
        images_ds = int(api.call("one.datastore.allocate",  # type: ignore[call-overload]
                                 f'NAME = "imgsinc"\nTYPE = "IMAGE_DS"\nDS_MAD = "fs"\nBASE_PATH = "{images}"', -1))
        yield Chains(api, realenv, datastores, bases, images_ds)
    for kind in ("rsync", "restic"):
        subprocess.run(realenv.ssh_argv("backup", ["rm", "-rf", "--", str(bases[kind])]), timeout=30, check=False)


def increments(image: etree._Element) -> list[tuple[int, str, int, str, int]]:
    """(ID, TYPE, PARENT_ID, SOURCE, SIZE) of each BACKUP_INCREMENTS/INCREMENT."""
    return [(int(i.findtext("ID") or ""), i.findtext("TYPE") or "", int(i.findtext("PARENT_ID") or ""),
             i.findtext("SOURCE") or "", int(i.findtext("SIZE") or "")) for i in image.iterfind("BACKUP_INCREMENTS/INCREMENT")]


def wait_state(api: Api, vm_id: int, state: str) -> None:
    """Until the daemon shows the VM in ``state`` (its monitoring follows libvirt's events)."""
    deadline = time.monotonic() + 60
    while api.vm(vm_id).findtext("STATE") != state:
        assert time.monotonic() < deadline, api.daemon.log()[-3000:]
        time.sleep(0.05)


def incremental_vm(chains: Chains, tiny_domain: Callable[..., TinyDomain]) -> tuple[TinyDomain, int]:
    dom = tiny_domain("host1", vdb_format="qcow2")
    vm_id = chains.api.import_one("host1", dom.name)
    chains.api.call("one.vm.updateconf", vm_id, INCREMENT, 1)
    return dom, vm_id


@pytest.mark.parametrize("kind", ["fs", "rsync", "restic"])
def test_each_backup_adds_a_link_and_each_link_is_the_disk_at_its_backup(
        chains: Chains, kind: str, tiny_domain: Callable[..., TinyDomain], hypervisors: Callable[[str], Hypervisor],
        tmp_path: Path) -> None:
    host1 = hypervisors("host1")
    dom, vm_id = incremental_vm(chains, tiny_domain)
    before = []
    for n, (pattern, offset) in enumerate([(0x11, "0"), (0x22, "16M"), (0x33, "40M")]):
        host1.write_pattern(dom, "vda", pattern=pattern, offset=offset, length="1M")
        host1.write_pattern(dom, "vdb", pattern=pattern + 1, offset=str(n) + "M", length="512k")
        before.append((snapshot_copy(dom.vda, tmp_path / f"vda.at-{n}", "qcow2"),
                       snapshot_copy(dom.vdb, tmp_path / f"vdb.at-{n}", "qcow2")))
        message = chains.backup(vm_id, kind)
        assert ("full base of a new chain" if n == 0 else f"increment {n}") in message

    [image_id] = [int(i.text or "") for i in chains.api.vm(vm_id).iterfind("BACKUPS/BACKUP_IDS/ID")]
    assert chains.pointers(vm_id) == (image_id, 2)
    image = chains.image(image_id)
    validate(image, "image")
    links = increments(image)
    assert [(i, t, p) for i, t, p, _, _ in links] == [(0, "FULL", -1), (1, "INCREMENT", 0), (2, "INCREMENT", 1)]
    assert int(image.findtext("SIZE") or "") == sum(size for *_, size in links)
    assert image.findtext("SOURCE") == links[0][3] and len({source for _, _, _, source, _ in links}) == 3
    urls = {u.findtext("DISK_ID"): u.findtext("URL") or "" for u in image.iterfind("TEMPLATE/BACKUP_URL")}
    chain_text = ",".join(f"{i}:{source}" for i, _, _, source, _ in links)
    assert set(urls) == {"0", "1"} and all(f"/{chain_text}/" in url for url in urls.values()), urls
    assert urls["0"].endswith("/disk.0.2")

    rebuilt = tmp_path / "rebuilt"
    rebuilt.mkdir()
    for n, (_, _, _, source, _) in enumerate(links):
        for disk in (0, 1):
            chains.fetch_link(kind, vm_id, source, f"disk.{disk}.{n}", rebuilt)
    for n, (vda_then, vdb_then) in enumerate(before):
        assert same_image(rebuilt / f"disk.0.{n}", vda_then), f"disk 0 at increment {n}"
        assert same_image(rebuilt / f"disk.1.{n}", vdb_then), f"disk 1 at increment {n}"
    for n in (1, 2):  # an increment holds what changed (1 MiB + 512 KiB), not the disk (96 MiB)
        assert (rebuilt / f"disk.0.{n}").stat().st_blocks * 512 < 4 * MiB
    for n, (vda_then, vdb_then) in enumerate(before):  # one.image.restore at each increment
        reply = str(chains.api.call("one.image.restore", image_id, chains.images_ds, f'INCREMENT_ID = "{n}"\n'
                                    f'NAME = "{kind}-at-{n}"\nNO_IP = "YES"'))
        _, *restored = map(int, reply.split())
        files = {int((chains.image(i).findtext("TEMPLATE/RESTORED_FROM") or "").split(":")[1]):
                 Path(chains.image(i).findtext("SOURCE") or "") for i in restored}
        assert same_image(files[0], vda_then) and same_image(files[1], vdb_then), f"restore at increment {n}"
        assert not subprocess.run(["qemu-img", "info", "--backing-chain", str(files[0])], capture_output=True,
                                  text=True, check=True).stdout.count("backing file")  # self-contained
    for n in (1, 2):  # a download by the URL of a later increment: the links merged into one qcow2
        url = urls["0"].replace(f"/{chain_text}/", "/" + ",".join(f"{i}:{src}" for i, _, _, src, _ in links[:n + 1]) + "/")
        old = f"/{links[2][3]}/disk.0.2" if kind != "restic" else "/disk.0.2"
        url = url.replace(old, f"/{links[n][3]}/disk.0.{n}" if kind != "restic" else f"/disk.0.{n}")
        got = vmsched(chains, "image", "download", url, "-o", str(tmp_path / f"dl.{n}"))  # type: ignore[arg-type]
        assert got.returncode == 0, got.stderr
        assert f"merged from {n + 1} links".encode() in got.stdout
        assert same_image(tmp_path / f"dl.{n}", before[n][0]), f"download at increment {n}"
        assert "backing file" not in subprocess.run(["qemu-img", "info", str(tmp_path / f"dl.{n}")], capture_output=True,
                                                    text=True, check=True).stdout
    assert not list(chains.bases[kind].glob("*.vmsched-download-*"))  # nothing of the merges stays behind
    assert "has no increment 3 (its increments: 0, 1, 2)" in chains.api.failure(
        "one.image.restore", image_id, chains.images_ds, 'INCREMENT_ID = "3"')
    # the checkpoints of the last two links stay; older ones are pruned
    assert host1.checkpoints(dom) == [f"vmsched-{vm_id}-1", f"vmsched-{vm_id}-2"]
    assert host1.disk_sources(dom) == {"vda": dom.vda, "vdb": dom.vdb} and host1.state(dom) == "running"

    whole = dict(chains.api.call("vmsched.image.verify", image_id, -1))  # type: ignore[call-overload]
    assert whole["OK"] and whole["MESSAGE"].startswith("3 links, 12 files match"), whole
    assert "6 disk files consistent" in whole["MESSAGE"], whole
    assert {f["FILE"] for f in whole["FILES"]} >= {f"{links[1][3]}/disk.0.1", f"{links[2][3]}/vm.xml"}
    middle = dict(chains.api.call("vmsched.image.verify", image_id, 1))  # type: ignore[call-overload]
    assert middle["OK"] and middle["MESSAGE"].startswith("2 links, 8 files"), middle
    if kind == "fs":  # a damaged link fails the verification of every increment built on it
        damaged = chains.bases["fs"] / str(vm_id) / links[1][3] / "disk.1.1"
        with damaged.open("r+b") as f:
            f.seek(-1, 2)
            last = f.read(1)
            f.seek(-1, 2)
            f.write(bytes([last[0] ^ 0xFF]))
        status, _, body = http_get(chains, urls["1"], chains.api.daemon.session)  # type: ignore[arg-type]
        assert status == 502 and b"differs from the sha256 recorded at backup time: nothing merged" in body, body
        broken = dict(chains.api.call("vmsched.image.verify", image_id, -1))  # type: ignore[call-overload]
        assert not broken["OK"] and f"link {links[1][3]}: verification failed: disk.1.1: sha256 mismatch" in \
            broken["MESSAGE"], broken
        assert dict(chains.api.call("vmsched.image.verify", image_id, 0))["OK"]  # type: ignore[call-overload]


@pytest.mark.parametrize("kind", ["fs", "rsync", "restic"])
def test_scheduled_backups_build_the_chain(chains: Chains, kind: str, tiny_domain: Callable[..., TinyDomain],
                                           hypervisors: Callable[[str], Hypervisor], tmp_path: Path) -> None:
    """SCHED_ACTIONs fired by the engine, not one.vm.backup: each adds a link, and the last restores as the
    disk was just before it ran."""
    host1 = hypervisors("host1")
    dom, vm_id = incremental_vm(chains, tiny_domain)
    for n in range(3):
        host1.write_pattern(dom, "vda", pattern=0x61 + n, offset=f"{8 * n}M", length="1M")
        then = snapshot_copy(dom.vda, tmp_path / f"vda.at-{n}", "qcow2")
        ok, message = chains.api.run_action(vm_id, "backup", f"{chains.datastores[kind]},0")
        assert ok, message
    [image_id] = [int(i.text or "") for i in chains.api.vm(vm_id).iterfind("BACKUPS/BACKUP_IDS/ID")]
    assert [i[:3] for i in increments(chains.image(image_id))] == [(0, "FULL", -1), (1, "INCREMENT", 0),
                                                                   (2, "INCREMENT", 1)]
    assert chains.pointers(vm_id) == (image_id, 2)
    reply = str(chains.api.call("one.image.restore", image_id, chains.images_ds,
                                f'DISK_ID = "0"\nNAME = "sched-{kind}"\nNO_IP = "YES"'))
    _, restored = map(int, reply.split())
    assert same_image(Path(chains.image(restored).findtext("SOURCE") or ""), then)


def test_a_chain_whose_checkpoint_was_deleted_heals_with_a_new_full(
        chains: Chains, tiny_domain: Callable[..., TinyDomain], hypervisors: Callable[[str], Hypervisor],
        tmp_path: Path) -> None:
    host1 = hypervisors("host1")
    dom, vm_id = incremental_vm(chains, tiny_domain)
    chains.backup(vm_id, "fs")
    chains.backup(vm_id, "fs")
    [first] = [int(i.text or "") for i in chains.api.vm(vm_id).iterfind("BACKUPS/BACKUP_IDS/ID")]
    host1.delete_checkpoint(dom, f"vmsched-{vm_id}-1")
    host1.write_pattern(dom, "vda", pattern=0x44, offset="8M", length="1M")
    now = snapshot_copy(dom.vda, tmp_path / "vda.now", "qcow2")

    message = chains.backup(vm_id, "fs")
    assert "full base of a new chain" in message and "vmsched-" in message and "gone" in message
    ids = [int(i.text or "") for i in chains.api.vm(vm_id).iterfind("BACKUPS/BACKUP_IDS/ID")]
    assert ids[0] == first and len(ids) == 2
    second = chains.image(ids[1])
    assert "gone" in (second.findtext("TEMPLATE/NEW_CHAIN_REASON") or "")
    assert second.findtext("TEMPLATE/NEW_CHAIN_CAUSE") == "checkpoint"
    with urllib.request.urlopen(chains.api.daemon.endpoint.replace("/RPC2", "/metrics"), timeout=10) as page:
        assert f'vmsched_backup_chains_restarted{{vm="{vm_id}",cause="checkpoint"}} 1' in page.read().decode()
    assert [i[:3] for i in increments(second)] == [(0, "FULL", -1)]
    assert [i[0] for i in increments(chains.image(first))] == [0, 1]  # the old chain is kept as it was
    assert chains.pointers(vm_id) == (ids[1], 0)
    base = chains.fetch_link("fs", vm_id, increments(second)[0][3], "disk.0.0", tmp_path)
    assert same_image(base, now)
    assert host1.checkpoints(dom) == [f"vmsched-{vm_id}-0"]

    message = chains.backup(vm_id, "fs")  # and the new chain goes on
    assert "increment 1" in message and chains.pointers(vm_id) == (ids[1], 1)


def test_reset_and_deleting_the_chain_image_start_new_chains(
        chains: Chains, tiny_domain: Callable[..., TinyDomain]) -> None:
    _, vm_id = incremental_vm(chains, tiny_domain)
    chains.backup(vm_id, "rsync")
    chains.backup(vm_id, "rsync")
    [first] = [int(i.text or "") for i in chains.api.vm(vm_id).iterfind("BACKUPS/BACKUP_IDS/ID")]
    sources = [i[3] for i in increments(chains.image(first))]
    message = chains.backup(vm_id, "rsync", reset=True)
    assert "full base of a new chain (a reset was asked for" in message
    second, last = chains.pointers(vm_id)
    assert second != first and last == 0

    chains.api.call("one.image.delete", second, False)
    assert chains.pointers(vm_id) == (-1, -1)
    chains.api.call("one.image.delete", first, False)
    assert not any((chains.bases["rsync"] / str(vm_id) / source).exists() for source in sources)
    message = chains.backup(vm_id, "rsync")
    assert message.startswith("live full base of a new chain of VM")


def test_a_vm_restored_in_place_at_a_middle_increment(
        chains: Chains, tiny_domain: Callable[..., TinyDomain], hypervisors: Callable[[str], Hypervisor],
        tmp_path: Path) -> None:
    host1 = hypervisors("host1")
    dom, vm_id = incremental_vm(chains, tiny_domain)
    middle = (tmp_path / "vda.middle", tmp_path / "vdb.middle")
    for n in range(3):
        host1.write_pattern(dom, "vda", pattern=0x50 + n, offset=f"{8 * n}M", length="2M")
        host1.write_pattern(dom, "vdb", pattern=0x60 + n, offset=f"{n}M", length="1M")
        if n == 1:
            snapshot_copy(dom.vda, middle[0], "qcow2")
            snapshot_copy(dom.vdb, middle[1], "qcow2")
        chains.backup(vm_id, "rsync")
    image_id, last = chains.pointers(vm_id)
    assert last == 2
    host1.destroy(dom)
    wait_state(chains.api, vm_id, "8")  # POWEROFF, seen by the daemon's monitoring
    chains.api.call("one.vm.restore", vm_id, image_id, 1, -1)
    status = wait_run(chains, "vmsched.vm.restorestatus", vm_id)  # type: ignore[arg-type]
    assert status["STATE"] == "done", f"{status}\n{chains.api.daemon.log()[-3000:]}"
    assert f"increment 1 {increments(chains.image(image_id))[1][3]}" in str(status["MESSAGE"])
    assert same_image(dom.vda, middle[0]) and same_image(dom.vdb, middle[1])
    assert chains.pointers(vm_id) == (-1, -1)  # an in-place restore ends the chain (spec §6.2)
    host1.start(dom)
    wait_state(chains.api, vm_id, "3")
    message = chains.backup(vm_id, "rsync")  # the next backup is a new base, checkpoints and all
    assert "full base of a new chain" in message


def snapshots_of(chains: Chains, vm_id: int) -> int:
    repo = chains.bases["restic"] / str(vm_id)
    return len(json.loads(restic_on_server(chains.realenv, repo, "snapshots", "--json")))


def check_restore_points(chains: Chains, image_id: int, expected: dict[int, tuple[Path, Path]], name: str) -> None:
    """Each increment the image lists restores (one.image.restore) to the disks as they were at it."""
    image = chains.image(image_id)
    assert [i[0] for i in increments(image)] == sorted(expected)
    for n, disks in expected.items():
        for disk_id, then in enumerate(disks):
            reply = str(chains.api.call("one.image.restore", image_id, chains.images_ds,
                                        f'INCREMENT_ID = "{n}"\nNAME = "{name}-{n}"\nDISK_ID = "{disk_id}"'))
            [restored] = map(int, reply.split()[1:])
            assert same_image(Path(chains.image(restored).findtext("SOURCE") or ""), then), f"disk {disk_id} at {n}"
            chains.api.call("one.image.delete", restored, False)


@pytest.mark.parametrize("kind", ["fs", "rsync", "restic"])
def test_keep_last_merges_the_oldest_increments_and_keeps_k_restore_points(
        chains: Chains, kind: str, tiny_domain: Callable[..., TinyDomain], hypervisors: Callable[[str], Hypervisor],
        tmp_path: Path) -> None:
    host1 = hypervisors("host1")
    dom, vm_id = incremental_vm(chains, tiny_domain)
    chains.api.call("one.vm.updateconf", vm_id, 'BACKUP_CONFIG = [ MODE = "INCREMENT", KEEP_LAST = "2" ]', 1)
    at: dict[int, tuple[Path, Path]] = {}
    for n in range(4):
        host1.write_pattern(dom, "vda", pattern=0x70 + n, offset=f"{4 + 8 * n}M", length="2M")
        at[n] = (snapshot_copy(dom.vda, tmp_path / f"vda.{n}", "qcow2"), snapshot_copy(dom.vdb, tmp_path / f"vdb.{n}", "qcow2"))
        message = chains.backup(vm_id, kind)
        if n >= 2:
            assert f"KEEP_LAST merged increments {n - 2}-{n - 1} into a new base" in message, message
    image_id, last = chains.pointers(vm_id)
    assert last == 3
    image = chains.image(image_id)
    validate(image, "image")
    links = increments(image)
    assert [(i, t, p) for i, t, p, _, _ in links] == [(2, "FULL", -1), (3, "INCREMENT", 2)]
    assert int(image.findtext("SIZE") or "") == sum(size for *_, size in links)
    assert image.findtext("STATE") == "1" and image.find("TEMPLATE/FLATTEN") is None
    if kind == "restic":
        assert snapshots_of(chains, vm_id) == 2
    else:
        assert sorted(p.name for p in (chains.bases[kind] / str(vm_id)).iterdir()) == sorted(s for *_, s, _ in links)
    check_restore_points(chains, image_id, {2: at[2], 3: at[3]}, f"{kind}-kept")
    assert dict(chains.api.call("vmsched.image.verify", image_id, -1))["OK"]  # type: ignore[call-overload]


def test_a_powered_off_vm_builds_its_chain_too_and_a_live_increment_follows(
        chains: Chains, tiny_domain: Callable[..., TinyDomain], hypervisors: Callable[[str], Hypervisor],
        tmp_path: Path) -> None:
    host1 = hypervisors("host1")
    dom = tiny_domain("host1", start=False, vdb_format="qcow2")
    vm_id = chains.api.import_one("host1", dom.name)
    chains.api.call("one.vm.updateconf", vm_id, INCREMENT, 1)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x40 0 1M", str(dom.vda)], check=True, capture_output=True)
    at_zero = snapshot_copy(dom.vda, tmp_path / "vda.0", "qcow2")
    assert "cold full base of a new chain" in chains.backup(vm_id, "fs")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x41 12M 2M", str(dom.vda)], check=True,
                   capture_output=True)
    at_one = snapshot_copy(dom.vda, tmp_path / "vda.1", "qcow2")
    assert "cold increment 1" in chains.backup(vm_id, "fs")
    host1.start(dom)
    wait_state(chains.api, vm_id, "3")
    host1.write_pattern(dom, "vda", pattern=0x42, offset="30M", length="1M")
    at_two = snapshot_copy(dom.vda, tmp_path / "vda.2", "qcow2")
    assert "live increment 2" in chains.backup(vm_id, "fs")
    image_id, last = chains.pointers(vm_id)
    assert last == 2 and [i[0] for i in increments(chains.image(image_id))] == [0, 1, 2]
    assert increments(chains.image(image_id))[1][4] <= 3  # MB: the 2 MiB written while off, not the disk
    check_restore_points(chains, image_id, {0: (at_zero, dom.vdb), 1: (at_one, dom.vdb),
                                                    2: (at_two, dom.vdb)}, "cold")
