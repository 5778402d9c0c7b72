"""The ``restic`` backup datastore: pure parts table-driven, the rest against the real environment (restic on
host1 sending over sftp to the backup server's sshd).

Expected checksums come from coreutils ``sha256sum``; repository checks use ``restic`` run by the test itself
with its own password file, an invocation independent of the driver's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import pytest

from drivers.commands import HostUnreachable, Result, Runner
from drivers.datastore import open_datastore
from drivers.datastore.base import FetchRequest
from drivers.datastore.restic import (
    ResticDatastore,
    ResticFailed,
    ResticUpload,
    lock_holder,
    mask,
    matches,
    parse_status,
    parse_summary,
    prune_options,
    restic_settings,
    sftp_command,
    transfer_options,
)
from drivers.ssh import SshTarget
from scheduler.errors import DriverError, NotFound, ValidationError
from tests import uploads
from tests.test_datastore_drivers import (
    FILES,
    QCOW2,
    STEP,
    VM_ID,
    VM_XML,
    Setup,
    client_ssh,
    datastore,
    pgrep,
    setup,  # noqa: F401 - the fixture
    sh,
    sha256sums,
    stage,
)

T = TypeVar("T")
PASSWORD = "s3cret-Rest1c-pw"
LOCKED_STDERR = (b"unable to create lock in backend: repository is already locked exclusively by PID 9931 on "
                 b"host1 by root (UID 0, GID 0)\nlock was created at 2026-11-26 07:19:15 (933ms ago)\n"
                 b"storage ID 8e8c626d\n")


# --- pure ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("attributes", "expected"),
    [({}, []),
     ({"RESTIC_COMPRESSION": "max"}, ["--compression", "max"]),
     ({"RESTIC_COMPRESSION": "OFF"}, []),  # compared case-sensitively: anything else is auto
     ({"RESTIC_COMPRESSION": "auto", "RESTIC_CONNECTIONS": "5"}, []),
     ({"RESTIC_CONNECTIONS": "8"}, ["-o", "sftp.connections=8"]),
     ({"RESTIC_BWLIMIT": "2048", "RESTIC_COMPRESSION": "off"},
      ["--compression", "off", "--limit-upload", "2048", "--limit-download", "2048"])],
)
def test_transfer_options(attributes: dict[str, str], expected: list[str]) -> None:
    ds = datastore("restic", RESTIC_PASSWORD=PASSWORD, RESTIC_SFTP_SERVER="b", **attributes)
    assert transfer_options(restic_settings(ds)) == expected


@pytest.mark.parametrize(
    ("attributes", "problem"),
    [({"RESTIC_SFTP_SERVER": "b"}, "RESTIC_PASSWORD"),
     ({"RESTIC_PASSWORD": "x"}, "RESTIC_SFTP_SERVER"),
     ({"RESTIC_PASSWORD": "x", "RESTIC_SFTP_SERVER": "b;rm"}, "RESTIC_SFTP_SERVER"),
     ({"RESTIC_PASSWORD": "x", "RESTIC_SFTP_SERVER": "b", "RESTIC_SFTP_USER": "-oProxy"}, "RESTIC_SFTP_USER"),
     ({"RESTIC_PASSWORD": "x", "RESTIC_SFTP_SERVER": "b", "RESTIC_BWLIMIT": "10M"}, "RESTIC_BWLIMIT"),
     ({"RESTIC_PASSWORD": "x", "RESTIC_SFTP_SERVER": "b", "RESTIC_PRUNE_MAX_UNUSED": "lots"}, "MAX_UNUSED"),
     ({"RESTIC_PASSWORD": "x", "RESTIC_SFTP_SERVER": "b", "RESTIC_PRUNE_MAX_REPACK": "1x"}, "MAX_REPACK")],
)
def test_bad_attributes_refused(attributes: dict[str, str], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        restic_settings(datastore("restic", **attributes))


def test_password_quotes_stripped_and_defaults() -> None:
    settings = restic_settings(datastore("restic", RESTIC_PASSWORD=f'"{PASSWORD}"', RESTIC_SFTP_SERVER="b"))
    assert settings.password == PASSWORD
    assert settings.target == SshTarget("b", 22, "oneadmin")
    assert PASSWORD not in repr(settings)
    assert prune_options(datastore("restic", RESTIC_PRUNE_MAX_REPACK="2G")) == (
        "--max-unused", "0", "--max-repack-size", "2G")


@pytest.mark.parametrize(
    ("ssh", "expected"),
    [(["ssh", "-i", "/k k"], "ssh -p 2222 -i '/k k' root@b -s sftp"),
     (["ssh", "-p", "9"], "ssh -p 9 root@b -s sftp"),
     (["ssh", "-c", "aes128-gcm@openssh.com,chacha20-poly1305@openssh.com"],  # restic splits options at commas
      "ssh -p 2222 -c aes128-gcm@openssh.com root@b -s sftp")],
)
def test_sftp_command(ssh: list[str], expected: str) -> None:
    assert sftp_command(ssh, SshTarget("b", 2222, "root")) == expected


def test_sftp_command_refuses_a_comma_restic_would_split() -> None:
    with pytest.raises(ValidationError, match="comma"):
        sftp_command(["ssh", "-o", "Ciphers=a,b"], SshTarget("b", 22, "root"))


def test_outputs_parsed() -> None:
    out = (b'{"message_type":"status","percent_done":0.5}\nnot json\n'
           b'{"message_type":"summary","data_added":12,"total_bytes_processed":3,"snapshot_id":"abcdef0123"}\n')
    assert parse_summary(out)["snapshot_id"] == "abcdef0123"
    with pytest.raises(DriverError, match="no summary"):
        parse_summary(b'{"message_type":"status"}\n')
    status = b'{"message_type":"status","percent_done":0.25,"total_bytes":400,"bytes_done":100}\n'
    assert parse_status(b'{"message_type":"status","total_bytes":400}\n' + status) == (100, 400)
    assert parse_status(status + b'{"message_type":"status","total_by') is None  # a line cut short
    assert parse_status(b"") is None and parse_status(out) is None  # nothing yet; the summary is no status
    assert lock_holder(LOCKED_STDERR) == "PID 9931 on host1 by root since 2026-11-26 07:19:15"
    assert lock_holder(b"Fatal: wrong password or no key found\n") is None
    assert mask(f"x {PASSWORD} y", PASSWORD) == "x ****** y"
    snapshot = {"id": "25f4b298aa", "tags": ["vmsched-6", "vmsched-backup-0011aabb"]}
    assert [matches(snapshot, s) for s in ("25f4b298", "0011aabb", "25f4b299", "vmsched")] == [
        True, True, False, False]


# --- real environment ----------------------------------------------------------------------------------------

def restic_store(s: Setup, password: str = PASSWORD, **attributes: object) -> ResticDatastore:
    backup = s.env.backup
    ds = datastore("restic", **{"RESTIC_PASSWORD": password, "RESTIC_SFTP_SERVER": backup.address,
                                "RESTIC_SFTP_USER": backup.user, "RESTIC_SFTP_PORT": backup.ssh_port,
                                "BASE_PATH": s.base, **attributes})
    store = open_datastore(ds, s.pool)
    assert isinstance(store, ResticDatastore)
    return store


async def restic(runner: Runner, repo: str, *args: str, check: bool = True) -> str:
    """The test's own restic run (password file written and removed by the script)."""
    script = ('f=$(mktemp) && cat > "$f" && r=$1 && shift && restic -q -r "$r" --password-file "$f" "$@"; '
              's=$?; rm -f "$f"; exit $s')
    return await sh(runner, script, repo, *args, input=PASSWORD.encode(), check=check)


async def upload(store: ResticDatastore, s: Setup, vm_id: int = VM_ID) -> tuple[str, ResticUpload]:
    backup_id = await store.new_backup_id(vm_id)
    result = await uploads.upload(store, s.host1, s.staging, FILES, vm_id, backup_id, timeout=STEP,
                                ssh_command=client_ssh(s.env))
    return backup_id, result


async def polled(probe: Callable[[], Awaitable[T]]) -> T:
    """The first truthy answer of ``probe``, asked every 50 ms for at most STEP seconds (no event to await:
    the state lives on another machine)."""
    async with asyncio.timeout(STEP):
        while True:
            answer = await probe()
            if answer:
                return answer
            await asyncio.sleep(0.05)


async def password_files(runner: Runner) -> str:
    return await sh(runner, 'grep -l -F -e "$1" /tmp/vmsched-restic-* 2>/dev/null; true', PASSWORD)


@pytest.mark.realenv
async def test_backup_restore_dedup_and_forget(setup: Setup) -> None:  # noqa: F811
    store = restic_store(setup)
    await stage(setup.host1, setup.staging)
    placeholder, first = await upload(store, setup)
    repo = store.layout.vm_dir(VM_ID)
    assert first.sha256 == await sha256sums(setup.host1, setup.staging, FILES)
    assert len(first.backup_id) == 8 and first.snapshot_id.startswith(first.backup_id)
    assert first.size_mb >= 64  # bytes processed: the qcow2's apparent size
    assert first.data_added >= 1024 * 1024  # the 1 MiB written into the qcow2

    assert await store.exists(VM_ID, placeholder)  # the id given before the upload, and the snapshot's own:
    assert await store.list_backup(VM_ID, first.backup_id) == sorted(FILES)
    assert await store.read_file(VM_ID, first.backup_id, "vm.xml") == VM_XML
    assert await store.stat(VM_ID, first.backup_id, 0) == 64
    with pytest.raises(NotFound):
        await store.read_file(VM_ID, first.backup_id, "domain.xml")
    restored = await sh(setup.server, 'f=$(mktemp) && cat > "$f" && restic -q -r "$1" --password-file "$f" '
                        'dump "$2" "$3" | sha256sum; rm -f "$f"', repo, first.snapshot_id,
                        f"/{QCOW2}", input=PASSWORD.encode())  # backed up from inside the staging dir
    assert restored.split()[0] == first.sha256[QCOW2]

    _, second = await upload(store, setup)  # the same files again: only metadata is new
    assert second.backup_id != first.backup_id
    assert second.data_added < 64 * 1024
    snapshots = json.loads(await restic(setup.server, repo, "snapshots", "--json"))
    assert {tag for snap in snapshots for tag in snap["tags"]} >= {f"vmsched-{VM_ID}", f"vmsched-backup-{placeholder}"}
    assert await password_files(setup.host1) == await password_files(setup.server) == ""

    await store.rm(VM_ID, [placeholder, "0badc0de"])
    with pytest.raises(NotFound):
        await store.rm(VM_ID, [first.backup_id])
    assert await store.exists(VM_ID, second.backup_id)


class _Listings:
    """The server's runner, counting the ``restic snapshots`` it is asked to run."""

    def __init__(self, runner: Runner) -> None:
        self.runner, self.count = runner, 0

    async def run(self, argv: Sequence[str], **options: Any) -> Result:
        self.count += "snapshots" in argv
        return await self.runner.run(argv, **options)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.runner, name)


@pytest.mark.realenv
async def test_reading_a_backup_lists_the_repository_once_and_a_change_lists_it_again(setup: Setup) -> None:  # noqa: F811
    """Each restic command derives the repository key (half a second): the files of one backup are found
    from one listing; vmsched's own change of the repository (a forget) drops it."""
    store = restic_store(setup)
    await stage(setup.host1, setup.staging)
    _, first = await upload(store, setup)
    counting = _Listings(store.server)
    store.server = counting  # type: ignore[assignment]
    assert await store.read_file(VM_ID, first.backup_id, "vm.xml") == VM_XML
    assert (await store.snapshot_file(VM_ID, first.backup_id, QCOW2))[0].startswith(first.snapshot_id)
    assert await store.read_file(VM_ID, first.backup_id, "vm.xml") == VM_XML
    assert counting.count == 1
    await store.rm(VM_ID, [first.backup_id])
    with pytest.raises(NotFound):
        await store.read_file(VM_ID, first.backup_id, "vm.xml")
    assert counting.count == 3  # rm's own listing, then a new one: the forgotten snapshot is not found


@pytest.mark.realenv
async def test_a_backup_is_read_without_a_listing_and_an_older_snapshot_after_one(setup: Setup) -> None:  # noqa: F811
    """vmsched's snapshots hold their files at /<name> (FLAT_TAG): a read selects the snapshot by the backup's
    tag and needs no listing first. A snapshot of absolute paths without that tag (as vmsched made them
    before) is still read, after one listing."""
    store = restic_store(setup)
    await stage(setup.host1, setup.staging)
    placeholder, first = await upload(store, setup)
    counting = _Listings(store.server)
    store.server = counting  # type: ignore[assignment]
    assert await store.read_file(VM_ID, placeholder, "vm.xml") == VM_XML
    with pytest.raises(NotFound, match=f"backup {placeholder} of VM {VM_ID} has no domain.xml"):
        await store.read_file(VM_ID, placeholder, "domain.xml")
    into = f"{setup.staging}.fetched"
    await sh(setup.host1, 'mkdir -p "$1"', into)
    digest = await store.fetch(FetchRequest(setup.host1, VM_ID, placeholder, QCOW2, f"{into}/new", STEP,
                                            client_ssh(setup.env)))
    assert digest == first.sha256[QCOW2] and counting.count == 0

    repo = store.layout.vm_dir(VM_ID)
    older = f"{repo}.older"
    await stage(setup.server, older)
    await restic(setup.server, repo, "backup", "--tag", f"vmsched-{VM_ID}", "--tag", "vmsched-backup-a1d0a1d0", "--",
                 f"{older}/vm.xml", f"{older}/{QCOW2}")
    assert await store.read_file(VM_ID, "a1d0a1d0", "vm.xml") == VM_XML
    digest = await store.fetch(FetchRequest(setup.host1, VM_ID, "a1d0a1d0", QCOW2, f"{into}/old", STEP,
                                            client_ssh(setup.env)))
    assert digest == (await sh(setup.server, 'sha256sum -- "$1"', f"{older}/{QCOW2}")).split()[0]
    assert counting.count == 1  # one listing found the older snapshot and its paths for both reads
    await sh(setup.server, 'rm -rf -- "$1"', older)


@pytest.mark.realenv
async def test_progress_comes_from_restic_status_lines(setup: Setup) -> None:  # noqa: F811
    store = open_datastore(restic_store(setup).datastore, setup.pool, progress_interval=0.05)
    assert isinstance(store, ResticDatastore)
    await stage(setup.host1, setup.staging, random_mib=256)  # about a second of work for restic here
    reports: list[tuple[int, int]] = []
    result = await uploads.upload(store, setup.host1, setup.staging, FILES, VM_ID, await store.new_backup_id(VM_ID),
                                timeout=STEP, ssh_command=client_ssh(setup.env),
                                progress=lambda done, total: reports.append((done["*"], total["*"])))
    total = 256 * 1024 * 1024 + len(VM_XML)
    assert reports[-1] == (total, total) and result.size_mb == 257
    during = reports[:-1]
    assert any(0 < done < total for done, _ in during), reports  # reports while restic ran, not only at the end
    assert [done for done, _ in during] == sorted(done for done, _ in during)


@pytest.mark.realenv
async def test_two_vms_concurrently_with_compression_off_and_max(setup: Setup) -> None:  # noqa: F811
    stores = {7: restic_store(setup, RESTIC_COMPRESSION="off"), 8: restic_store(setup, RESTIC_COMPRESSION="max")}
    await stage(setup.host1, setup.staging)
    results = await asyncio.gather(*(upload(store, setup, vm_id) for vm_id, store in stores.items()))
    assert results[0][1].sha256 == results[1][1].sha256
    sizes = {}
    for vm_id, store in stores.items():
        assert await store.read_file(vm_id, results[vm_id - 7][0], "vm.xml") == VM_XML
        out = await sh(setup.server, "find \"$1/data\" -type f -printf '%s\\n' | awk '{ s += $1 } END { print s }'",
                       store.layout.vm_dir(vm_id))
        sizes[vm_id] = int(out.split()[0])
    assert sizes[7] > 1024 * 1024 > 10 * sizes[8]  # 1 MiB of 0xab stored as is, and compressed to almost nothing


@pytest.mark.realenv
async def test_wrong_password_and_unreachable_server_are_clear(setup: Setup) -> None:  # noqa: F811
    await stage(setup.host1, setup.staging)
    backup_id, _ = await upload(restic_store(setup), setup)
    wrong = "Wr0ng-pa55word-xyz"
    bad = restic_store(setup, password=wrong)
    for call in (bad.new_backup_id(VM_ID), bad.read_file(VM_ID, backup_id, "vm.xml")):
        with pytest.raises(ResticFailed, match="wrong RESTIC_PASSWORD") as caught:
            await call
        assert wrong not in str(caught.value) and PASSWORD not in str(caught.value)

    nowhere = restic_store(setup, RESTIC_SFTP_PORT=1)
    with pytest.raises(HostUnreachable):
        await nowhere.new_backup_id(VM_ID)
    store = restic_store(setup)
    ssh = [*client_ssh(setup.env), "-p", "1"]  # the hypervisor cannot reach the sftp server
    # ssh's own "Connection refused" when restic relays it in time; the server named either way
    with pytest.raises(ResticFailed, match=r"restic backup.*(Connection refused|cannot reach the SFTP server)") \
            as caught:
        await uploads.upload(store, setup.host1, setup.staging, FILES, VM_ID, backup_id, timeout=STEP, ssh_command=ssh)
    assert PASSWORD not in str(caught.value)


@pytest.mark.realenv
async def test_killed_backup_hides_password_and_its_stale_lock_is_removed(
        setup: Setup, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    slow = restic_store(setup, RESTIC_BWLIMIT=256, RESTIC_NICE=5)
    await stage(setup.host1, setup.staging, random_mib=8)  # 8 MiB at 256 KiB/s: half a minute unless killed
    backup_id = await slow.new_backup_id(VM_ID)
    task = asyncio.create_task(uploads.upload(slow, setup.host1, setup.staging, FILES, VM_ID, backup_id, timeout=120,
                                           ssh_command=client_ssh(setup.env)))
    marker = Path(setup.staging).name

    async def restic_processes() -> list[str]:
        return [line for line in (await pgrep(setup.host1, marker)).splitlines() if line.split()[1] == "restic"]

    repo = slow.layout.vm_dir(VM_ID)
    await polled(lambda: sh(setup.server, 'ls "$1/locks"', repo))  # restic has opened the repository
    restics = await polled(restic_processes)
    ps = await setup.host1.run(["ps", "-eo", "args"], timeout=STEP)
    assert marker.encode() in ps.stdout and PASSWORD.encode() not in ps.stdout
    assert "--limit-upload 256" in restics[0] and "--password-file /tmp/vmsched-restic-" in restics[0]
    await setup.host1.run(["kill", "-9", restics[0].split()[0]], timeout=STEP)
    with caplog.at_level(logging.INFO, logger="drivers.datastore.restic"), pytest.raises(ResticFailed) as caught:
        await task
    assert PASSWORD not in str(caught.value)
    assert await sh(setup.server, 'ls "$1/locks"', repo) == ""  # the dead restic's lock, removed where it ran
    assert any("after the backup stopped" in record.getMessage() for record in caplog.records)
    assert await password_files(setup.host1) == ""

    store = restic_store(setup)
    await stage(setup.host1, setup.staging)
    placeholder, result = await upload(store, setup)
    async with foreign_lock(setup, repo):  # a restic killed outside the driver leaves a stale lock
        await sh(setup.server, 'pkill -9 -f -- "$1"', f"[r]estic -r {repo} ")
        await polled(lambda: sh(setup.server, 'pgrep -f -- "$1" >/dev/null || echo gone', f"[r]estic -r {repo} "))
    assert await sh(setup.server, 'ls "$1/locks"', repo) != ""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="drivers.datastore.restic"):
        await store.rm(VM_ID, [placeholder])  # forget needs an exclusive lock: the stale one must go first
    assert any("locked by PID" in record.getMessage() for record in caplog.records)
    assert not await store.exists(VM_ID, result.backup_id)
    await restic(setup.server, repo, "check")


@asynccontextmanager
async def foreign_lock(s: Setup, repo: str) -> AsyncIterator[None]:
    """``repo`` locked by a live restic started outside the driver: a backup of a stdin that never ends."""
    script = ('f=$(mktemp) && cat > "$f" && sleep 600 | restic -r "$1" --password-file "$f" backup --stdin; '
              'rm -f "$f"')
    holder = asyncio.create_task(s.server.run(["sh", "-c", script, "sh", repo], timeout=60,
                                              input=PASSWORD.encode(), check=False))
    try:
        await polled(lambda: sh(s.server, 'ls "$1/locks"', repo))
        yield
    finally:
        holder.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await holder


@pytest.mark.realenv
async def test_live_lock_held_elsewhere_is_waited_for_then_reported(setup: Setup) -> None:  # noqa: F811
    store = restic_store(setup)
    await stage(setup.host1, setup.staging)
    backup_id, _ = await upload(store, setup)
    store.lock_wait = 1.5
    repo = store.layout.vm_dir(VM_ID)
    async with foreign_lock(setup, repo):
        started = asyncio.get_running_loop().time()
        with pytest.raises(ResticFailed, match=r"locked by PID [0-9]+ on \S+ by \S+ since 20[0-9-]+ ") as caught:
            await store.rm(VM_ID, [backup_id])
        assert caught.value.retryable
        assert 1.5 <= asyncio.get_running_loop().time() - started < STEP
        assert await sh(setup.server, 'ls "$1/locks"', repo) != ""  # a live lock is never removed
    store.lock_wait = STEP
    await store.rm(VM_ID, [backup_id])  # works once the holder is gone (its lock removed, or stale and unlocked)
    assert not await store.exists(VM_ID, backup_id)


def test_an_sftp_session_that_never_started_names_the_server() -> None:
    ds = datastore("restic", RESTIC_PASSWORD=PASSWORD, RESTIC_SFTP_SERVER="sftp.example", RESTIC_SFTP_PORT=2222,
                   RESTIC_SFTP_USER="bk", BASE_PATH="/srv/r")
    store = ResticDatastore(ds, server=None)  # type: ignore[arg-type]  # only the message is built here
    stderr = b"Fatal: unable to open repository at sftp:bk@sftp.example:/srv/r/6: unable to start the sftp session\n"
    failed = store._failed(SimpleNamespace(host="host1"), "sftp:bk@sftp.example:/srv/r/6",  # type: ignore[arg-type]
                           ["backup"], Result(1, b"", stderr, 0.1))
    assert "host1: `restic backup`" in str(failed)
    assert "cannot reach the SFTP server bk@[sftp.example]:2222 from host1" in str(failed)
