"""The ``rsync`` and ``fs`` backup datastores against the real environment (host1, the backup server).

Expected checksums come from coreutils ``sha256sum`` run where the files are, an implementation other than
the driver's hasher; sparseness is checked with the allocated size the server reports.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from drivers.commands import CommandFailed, CommandTimeout, Result, Runner
from drivers.datastore import open_datastore
from drivers.datastore.base import FetchRequest, TreeDatastore, hash_files
from drivers.datastore.fs import FsDatastore
from drivers.datastore.rsync import RsyncDatastore, run_rsync
from drivers.local import LocalRunner
from drivers.ssh import SshPool, SshSettings, SshTarget
from scheduler.errors import DriverError, NotFound, ValidationError
from scheduler.model.objects.datastore import Datastore
from scheduler.model.objects.states import DatastoreType
from scheduler.model.template import Template
from tests import uploads
from tests.realenv.model import RealEnv

VM_ID = 6
STEP = 20.0  # seconds: deadline of any single wait in these tests
VM_XML = b"<VM><ID>6</ID><TEMPLATE><DISK><DISK_ID>0</DISK_ID><SIZE>64</SIZE></DISK></TEMPLATE></VM>\n"
QCOW2 = "disk.0.0"
FILES = [QCOW2, "vm.xml"]


def datastore(ds_mad: str, **attributes: object) -> Datastore:
    template = Template()
    for name, value in attributes.items():
        template.set(name, str(value))
    return Datastore(id=100, name=f"backup-{ds_mad}", type=DatastoreType.BACKUP_DS, ds_mad=ds_mad,
                     template=template)


def client_ssh(env: RealEnv) -> list[str]:
    """How a host reaches another one: the test client key and the strict known_hosts of the environment."""
    return ["ssh", "-F", "/dev/null", "-i", str(env.ssh.client_key), "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={env.ssh.known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-c", "aes128-gcm@openssh.com"]


async def sh(runner: Runner, script: str, *args: str, input: bytes | None = None, check: bool = True) -> str:
    result = await runner.run(["sh", "-c", script, "sh", *args], timeout=STEP, input=input, check=check)
    return result.stdout.decode()


async def sha256sums(runner: Runner, directory: str, names: list[str]) -> dict[str, str]:
    out = await sh(runner, 'cd "$1" && shift && sha256sum -- "$@"', directory, *names)
    return {line.split()[1]: line.split()[0] for line in out.splitlines()}


async def pgrep(runner: Runner, marker: str) -> str:
    """The processes whose command line holds ``marker``; the ``[x]yz`` pattern keeps the search out of it."""
    pattern = f"[{marker[0]}]{marker[1:]}"
    return (await runner.run(["pgrep", "-a", "-f", "--", pattern], timeout=STEP, check=False)).stdout.decode()


async def stage(runner: Runner, directory: str, *, random_mib: int = 0) -> None:
    """A sparse 64 MiB qcow2 with 1 MiB written, plus vm.xml; or ``random_mib`` MiB of random bytes."""
    await sh(runner, 'mkdir -p "$1" && cat > "$1/vm.xml"', directory, input=VM_XML)
    disk = f"{directory}/{QCOW2}"
    if random_mib:
        await sh(runner, 'head -c "$2" /dev/urandom > "$1"', disk, str(random_mib * 1024 * 1024))
        return
    await runner.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", disk, "64M"],
                     timeout=STEP)
    await runner.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xab 0 1M", disk], timeout=STEP)


@dataclass
class Setup:
    env: RealEnv
    pool: SshPool
    host1: Runner
    server: Runner
    base: str
    staging: str


@pytest.fixture
async def setup(realenv: RealEnv) -> AsyncIterator[Setup]:
    pool = SshPool(SshSettings(known_hosts=realenv.ssh.known_hosts, key=realenv.ssh.client_key, connect_timeout=5))
    host = realenv.host("host1")
    backup = realenv.backup
    marker = f"vmsched-dstest-{uuid.uuid4().hex[:12]}"
    setup = Setup(realenv, pool, pool.runner(SshTarget(host.address, host.ssh_port, host.user)),
                  pool.runner(SshTarget(backup.address, backup.ssh_port, backup.user)),
                  f"{backup.data_dir}/{marker}", f"/var/tmp/{marker}")
    try:
        yield setup
    finally:
        await sh(setup.server, 'rm -rf -- "$1"', setup.base, check=False)
        await sh(setup.host1, 'rm -rf -- "$1"', setup.staging, check=False)
        await pool.close()


def rsync_store(s: Setup, **attributes: object) -> RsyncDatastore:
    backup = s.env.backup
    ds = datastore("rsync", RSYNC_HOST=backup.address, RSYNC_USER=backup.user, RSYNC_PORT=backup.ssh_port,
                   BASE_PATH=s.base, **attributes)
    store = open_datastore(ds, s.pool, progress_interval=0.1)
    assert isinstance(store, RsyncDatastore)
    return store


async def assert_arrived(store: TreeDatastore, reader: Runner, source: Runner, staging: str, backup_id: str,
                         sha256: dict[str, str]) -> None:
    """Every file under ``<backup_id>/`` with the source's checksums, the qcow2 still sparse, no temp dir."""
    final = store.layout.backup_dir(VM_ID, backup_id)
    assert sha256 == await sha256sums(source, staging, FILES)
    assert await sha256sums(reader, final, FILES) == sha256
    assert await store.list_backup(VM_ID, backup_id) == sorted(FILES)
    assert ".tmp-" not in await sh(reader, 'ls -A "$1"', store.layout.vm_dir(VM_ID))
    apparent, blocks, unit = map(int, (await sh(reader, 'stat -c "%s %b %B" "$1"', f"{final}/{QCOW2}")).split())
    assert apparent > 64 * 1024 * 1024
    assert blocks * unit < 4 * 1024 * 1024  # the holes stayed holes (1 MiB written + metadata)


# --- rsync -------------------------------------------------------------------------------------------------------

@pytest.mark.realenv
async def test_rsync_monitor_creates_base_path_and_reports_plain_numbers(setup: Setup) -> None:
    store = rsync_store(setup)
    capacity = await store.monitor()
    assert await sh(setup.server, 'test -d "$1" && echo yes', setup.base) == "yes\n"
    assert all(isinstance(v, int) for v in (capacity.total_mb, capacity.free_mb, capacity.used_mb))
    assert 0 < capacity.free_mb <= capacity.total_mb and 0 < capacity.used_mb < capacity.total_mb
    df = (await sh(setup.server, 'df -PB1M "$1" | tail -1', setup.base)).split()
    assert capacity.total_mb == int(df[1])


@pytest.mark.realenv
async def test_rsync_upload_from_host1_to_the_backup_server(setup: Setup) -> None:
    store = rsync_store(setup)
    await stage(setup.host1, setup.staging)
    backup_id = await store.new_backup_id(VM_ID)
    seen: list[tuple[int, int]] = []
    result = await uploads.upload(store, setup.host1, setup.staging, FILES, VM_ID, backup_id, timeout=STEP,
                                ssh_command=client_ssh(setup.env), progress=lambda d, t: seen.append((sum(d.values()), sum(t.values()))))
    await assert_arrived(store, setup.server, setup.host1, setup.staging, backup_id, result.sha256)
    assert 1 <= result.size_mb <= 4
    assert seen and seen[-1][0] == seen[-1][1] > 64 * 1024 * 1024

    assert await store.exists(VM_ID, backup_id)
    assert await store.read_file(VM_ID, backup_id, "vm.xml") == VM_XML
    assert await store.stat(VM_ID, backup_id, 0) == 64
    with pytest.raises(NotFound):
        await store.read_file(VM_ID, backup_id, "domain.xml")

    await store.rm(VM_ID, [backup_id, "abcdef"])
    assert not await store.exists(VM_ID, backup_id)
    with pytest.raises(NotFound):
        await store.rm(VM_ID, [backup_id])


@pytest.mark.realenv
async def test_rsync_upload_cancelled_leaves_no_rsync_and_no_temp_dir(setup: Setup) -> None:
    # 16 MiB at 512 KiB/s: half a minute unless cancelled
    store = rsync_store(setup, RSYNC_BWLIMIT="512", RSYNC_NICE=7, RSYNC_IONICE=6)
    await stage(setup.host1, setup.staging, random_mib=16)
    backup_id = await store.new_backup_id(VM_ID)
    started = asyncio.Event()

    def progress(done: Mapping[str, int], total: Mapping[str, int]) -> None:
        if sum(done.values()) > 0:
            started.set()

    upload = asyncio.create_task(uploads.upload(store, setup.host1, setup.staging, FILES, VM_ID, backup_id, timeout=120,
                                              ssh_command=client_ssh(setup.env), progress=progress))
    async with asyncio.timeout(STEP):
        await started.wait()
    marker = Path(setup.staging).name  # in rsync's argv (staging dir) and its ssh's (remote temp dir)
    senders = [line.split()[0] for line in (await pgrep(setup.host1, marker)).splitlines()
               if line.split()[1] == "rsync" and "--server" not in line]
    assert len(senders) == 1
    niceness = await setup.host1.run(["ps", "-o", "ni=", "-p", senders[0]], timeout=STEP)
    assert niceness.stdout.split() == [b"7"]
    assert (await setup.host1.run(["ionice", "-p", senders[0]], timeout=STEP)).stdout.strip() == b"best-effort: prio 6"
    upload.cancel()
    with pytest.raises(asyncio.CancelledError):
        await upload
    assert await pgrep(setup.host1, marker) == ""
    leftovers = await sh(setup.server, 'ls -A "$1"', store.layout.vm_dir(VM_ID))
    assert leftovers == ""
    assert not await store.exists(VM_ID, backup_id)


@pytest.mark.realenv
async def test_rsync_fetch_all_brings_files_of_several_backups_to_host1_in_two_sessions(setup: Setup) -> None:
    """The first file in its own session, the rest cut from one stream: each byte-identical, each digest the
    server's sha256sum; a file missing on the server fails the whole fetch."""
    store = rsync_store(setup)
    sums: dict[str, dict[str, str]] = {}
    for random_mib in (3, 1):
        await stage(setup.host1, setup.staging, random_mib=random_mib)
        backup_id = await store.new_backup_id(VM_ID)
        await uploads.upload(store, setup.host1, setup.staging, FILES, VM_ID, backup_id, timeout=STEP,
                             ssh_command=client_ssh(setup.env))
        sums[backup_id] = await sha256sums(setup.server, store.layout.backup_dir(VM_ID, backup_id), FILES)
    wanted = [(backup_id, name) for backup_id in sums for name in FILES]
    into = f"{setup.staging}/fetched"
    await sh(setup.host1, 'mkdir -p "$1"', into)
    requests = [FetchRequest(setup.host1, VM_ID, backup_id, name, f"{into}/{n}", STEP, client_ssh(setup.env))
                for n, (backup_id, name) in enumerate(wanted)]
    digests = await store.fetch_all(requests)
    assert digests == [sums[backup_id][name] for backup_id, name in wanted]
    assert await sha256sums(setup.host1, into, [str(n) for n in range(len(wanted))]) == {
        str(n): sums[backup_id][name] for n, (backup_id, name) in enumerate(wanted)}

    missing = [*requests[:2], FetchRequest(setup.host1, VM_ID, wanted[0][0], "disk.1.0", f"{into}/x", STEP,
                                           client_ssh(setup.env))]
    with pytest.raises(DriverError, match="disk.1.0"):
        await store.fetch_all(missing)


@pytest.mark.realenv
async def test_cleanup_partial_removes_only_temp_dirs(setup: Setup) -> None:
    store = rsync_store(setup)
    vm_dir = store.layout.vm_dir(VM_ID)
    await sh(setup.server, 'mkdir -p "$1/.tmp-abcdef/x" "$1/.tmp-123456" "$1/fedcba"', vm_dir)
    assert sorted(await store.cleanup_partial(VM_ID)) == ["123456", "abcdef"]
    assert await sh(setup.server, 'ls -A "$1"', vm_dir) == "fedcba\n"
    assert await store.cleanup_partial(VM_ID + 1) == []  # no directory for that VM: nothing to do


@pytest.mark.realenv
async def test_new_backup_id_is_hex_and_unused(setup: Setup) -> None:
    store = rsync_store(setup)
    ids = {await store.new_backup_id(VM_ID) for _ in range(3)}
    assert all(len(i) == 6 and int(i, 16) >= 0 for i in ids)


# --- fs --------------------------------------------------------------------------------------------------------

async def test_fs_upload_from_a_local_hypervisor(tmp_path: Path) -> None:
    local = LocalRunner()
    staging = str(tmp_path / "staging")
    await stage(local, staging)
    store = FsDatastore(datastore("fs", BASE_PATH=tmp_path / "fs"))
    backup_id = await store.new_backup_id(VM_ID)
    result = await uploads.upload(store, local, staging, FILES, VM_ID, backup_id, timeout=STEP)
    expected = {name: hashlib.sha256((tmp_path / "staging" / name).read_bytes()).hexdigest() for name in FILES}
    assert result.sha256 == expected
    await assert_arrived(store, local, local, staging, backup_id, result.sha256)
    assert await store.stat(VM_ID, backup_id, 0) == 64


async def test_fs_failed_upload_leaves_no_temp_dir_and_an_existing_backup_is_not_overwritten(tmp_path: Path) -> None:
    local = LocalRunner()
    staging = str(tmp_path / "staging")
    await stage(local, staging)
    store = FsDatastore(datastore("fs", BASE_PATH=tmp_path / "fs"))
    with pytest.raises(DriverError, match="disk.9.0"):
        await uploads.upload(store, local, staging, [*FILES, "disk.9.0"], VM_ID, "abcdef", timeout=STEP)
    assert os.listdir(store.layout.vm_dir(VM_ID)) == []
    await uploads.upload(store, local, staging, FILES, VM_ID, "abcdef", timeout=STEP)
    with pytest.raises(DriverError, match="exists already"):
        await uploads.upload(store, local, staging, ["vm.xml"], VM_ID, "abcdef", timeout=STEP)
    assert await store.list_backup(VM_ID, "abcdef") == sorted(FILES)


async def test_fs_monitor_of_a_local_dir_applies_limit_mb(tmp_path: Path) -> None:
    base = tmp_path / "fs" / "100"
    plain = await FsDatastore(datastore("fs", BASE_PATH=base)).monitor()
    assert base.is_dir()
    stats = os.statvfs(base)
    assert plain.total_mb == -(-stats.f_blocks * stats.f_frsize // (1024 * 1024))
    limit = plain.used_mb + 100
    limited = await FsDatastore(datastore("fs", BASE_PATH=base, LIMIT_MB=limit)).monitor()
    assert limited.total_mb == limit
    assert 50 <= limited.free_mb <= 150  # LIMIT_MB - USED, give or take what others wrote meanwhile


@pytest.mark.realenv
async def test_fs_upload_pulled_from_host1(setup: Setup, tmp_path: Path) -> None:
    await stage(setup.host1, setup.staging)
    store = FsDatastore(datastore("fs", BASE_PATH=tmp_path / "fs"))
    backup_id = await store.new_backup_id(VM_ID)
    result = await uploads.upload(store, setup.host1, setup.staging, FILES, VM_ID, backup_id, timeout=STEP,
                                ssh_command=client_ssh(setup.env))
    await assert_arrived(store, LocalRunner(), setup.host1, setup.staging, backup_id, result.sha256)


class WithoutOpenssl(LocalRunner):
    """This machine as if openssl were not installed (fault injection: the command is not found)."""

    async def run(self, argv: Sequence[str], **options: Any) -> Result:
        words = ["openssl-is-not-installed", *argv[1:]] if argv[0] == "openssl" else argv
        return await super().run(words, **options)


async def test_hashing_falls_back_to_python_without_openssl(tmp_path: Path) -> None:
    paths = [tmp_path / "a", tmp_path / "b"]
    paths[0].write_bytes(os.urandom(3 * 1024 * 1024 + 7))
    paths[1].write_bytes(b"")
    expected = {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}
    for runner in (LocalRunner(), WithoutOpenssl()):
        assert await hash_files(runner, [str(p) for p in paths], timeout=STEP) == expected


async def test_upload_past_its_deadline_is_killed_and_cleaned_up(tmp_path: Path) -> None:
    local = LocalRunner()
    staging = str(tmp_path / "staging")
    await stage(local, staging)
    store = FsDatastore(datastore("fs", BASE_PATH=tmp_path / "fs", FS_NICE=5))
    os.mkfifo(f"{staging}/disk.1.0")  # never ends: cp and the hasher wait on it
    with pytest.raises(CommandTimeout):
        await uploads.upload(store, local, staging, [*FILES, "disk.1.0"], VM_ID, "abcdef", timeout=0.5)
    assert os.listdir(store.layout.vm_dir(VM_ID)) == []


# --- refusals before any command runs ---------------------------------------------------------------------------

class NoCommands:
    """A runner that fails the test when called: the refusals below must happen before any command."""

    host = "nowhere"

    async def run(self, argv: object, **_: object) -> object:
        raise AssertionError(f"no command expected, got {argv!r}")


@pytest.mark.parametrize(
    "call",
    [lambda s: s.exists("../x", "abcdef"), lambda s: s.rm(6, ["../../etc"]), lambda s: s.cleanup_partial("1/.."),
     lambda s: s.read_file(6, "abcdef", "../../../etc/shadow"), lambda s: s.list_backup(6, ".tmp-abcdef"),
     lambda s: s.new_backup_id("../x"),
     lambda s: uploads.upload(s, NoCommands(), "/var/tmp/x", ["../../etc/passwd"], 6, "abcdef", timeout=1),
     lambda s: uploads.upload(s, NoCommands(), "/var/tmp/../../etc", ["vm.xml"], 6, "abcdef", timeout=1),
     lambda s: uploads.upload(s, NoCommands(), "/var/tmp/x", ["vm.xml"], "../x", "abcdef", timeout=1)],
)
async def test_path_escapes_refused(call: object) -> None:
    ds = datastore("rsync", RSYNC_HOST="backup.example", BASE_PATH="/srv/backup")
    store = RsyncDatastore(ds, NoCommands())  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        await call(store)  # type: ignore[operator]


@pytest.mark.parametrize(
    ("ds_mad", "attributes"),
    [("rsync", {"RSYNC_HOST": "b", "BASE_PATH": "/srv/../etc"}), ("fs", {"BASE_PATH": "relative"}),
     ("rsync", {"BASE_PATH": "/srv"}), ("restic", {"BASE_PATH": "/srv"}), ("fs", {"BASE_PATH": "/srv", "FS_NICE": "x"})],
)
def test_bad_datastores_refused(ds_mad: str, attributes: dict[str, str]) -> None:
    with pytest.raises(ValidationError):
        open_datastore(datastore(ds_mad, **attributes), SshPool(SshSettings(known_hosts=Path("/nonexistent"))))


class _FailingRunner:
    """Fault injection: every command exits with ``status``."""

    def __init__(self, status: int) -> None:
        self.status = status

    async def run(self, argv: Sequence[str], **_: Any) -> Result:
        raise CommandFailed(argv, self.status, b"rsync error: something", host="host1")


@pytest.mark.parametrize(("status", "retryable"), [(255, True), (12, True), (10, True), (30, True), (23, False),
                                                   (1, False), (11, False)])
async def test_an_rsync_that_lost_its_connection_may_be_retried_other_failures_not(status: int,
                                                                                    retryable: bool) -> None:
    with pytest.raises(CommandFailed) as failed:
        await run_rsync(_FailingRunner(status), ["rsync", "-aS", "a", "b:c"], timeout=STEP)  # type: ignore[arg-type]
    assert failed.value.retryable is retryable
    assert failed.value.exit_status == status and "rsync error: something" in str(failed.value)
