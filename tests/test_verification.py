"""Backup verification's pure parts (qemu-img check answers, the verdict, what is recorded), the streaming
reader of backup files (on this machine: real files, real processes), and the download's session header."""

from __future__ import annotations

import hashlib
import os
import shlex
from pathlib import Path

import pytest

from drivers.datastore.check import ImageCheck, read_check
from drivers.datastore.stream import open_stream, reader_argv, size_then
from drivers.ssh import SshSettings
from scheduler.api.download import session_from
from scheduler.backup.verify import NO_QEMU_IMG, Verification, files_to_read, recorded_on, verdict
from scheduler.errors import ActionError, AuthError, NotFound, ValidationError
from scheduler.model.objects.datastore import Datastore
from scheduler.model.objects.image import Image
from scheduler.model.objects.states import DatastoreType, ImageType
from scheduler.model.template import Template

OK_REPORT = b'{"image-end-offset": 262144, "total-clusters": 256, "check-errors": 0, "format": "qcow2"}'
CORRUPT_REPORT = b'{"total-clusters": 256, "corruptions": 3, "check-errors": 0}'
LEAKS_REPORT = b'{"total-clusters": 256, "leaks": 2, "check-errors": 0}'


@pytest.mark.parametrize(("status", "stdout", "stderr", "expected"), [
    (0, OK_REPORT, b"", ImageCheck(True, "ok")),
    (3, LEAKS_REPORT, b"", ImageCheck(True, "ok (2 leaked clusters)")),
    (2, CORRUPT_REPORT, b"ERROR ...", ImageCheck(False, "corrupt: 3 corruptions")),
    (1, b"", b"qemu-img: Could not open 'x': Image is not in qcow2 format\n",
     ImageCheck(False, "check failed: qemu-img: Could not open 'x': Image is not in qcow2 format")),
    (1, b"not json", b"", ImageCheck(False, "check failed: exit status 1")),
    (127, b"", b"sh: qemu-img: not found", ImageCheck(True, "skipped: qemu-img not installed", installed=False)),
    (63, b"", b"", ImageCheck(True, "no check for this format")),
    (0, CORRUPT_REPORT, b"", ImageCheck(False, "corrupt: 3 corruptions")),  # the report wins over the status
])  # fmt: skip
def test_read_check(status: int, stdout: bytes, stderr: bytes, expected: ImageCheck) -> None:
    assert read_check(status, stdout, stderr) == expected


A, B, C = "a" * 64, "b" * 64, "c" * 64
RECORDED = {"disk.0.0": A, "vm.xml": B, "domain.xml": C}
ALL = ["disk.0.0", "domain.xml", "vm.xml"]
GOOD = {"disk.0.0": A, "vm.xml": B, "domain.xml": C}
CHECK_OK = {"disk.0.0": ImageCheck(True, "ok")}


@pytest.mark.parametrize(("present", "digests", "checks", "ok", "message", "bad"), [
    (ALL, GOOD, CHECK_OK, True, "3 files match their recorded sha256; qemu-img check: 1 disk consistent", []),
    (ALL, GOOD, {"disk.0.0": ImageCheck(True, "skipped: qemu-img not installed", installed=False)}, True,
     f"3 files match their recorded sha256; {NO_QEMU_IMG}", []),
    (ALL, {**GOOD, "disk.0.0": C}, CHECK_OK, False, "verification failed: disk.0.0: sha256 mismatch", ["disk.0.0"]),
    (ALL, GOOD, {"disk.0.0": ImageCheck(False, "corrupt: 3 corruptions")}, False,
     "verification failed: disk.0.0: corrupt: 3 corruptions", []),
    (["disk.0.0", "domain.xml"], GOOD, CHECK_OK, False, "verification failed: vm.xml: missing", ["vm.xml"]),
    ([*ALL, "disk.1.0"], {**GOOD, "disk.1.0": A}, {**CHECK_OK, "disk.1.0": ImageCheck(True, "ok")}, False,
     "verification failed: disk.1.0: no checksum recorded", ["disk.1.0"]),
    ([*ALL, "notes.txt"], GOOD, CHECK_OK, True, "3 files match their recorded sha256; qemu-img check: 1 disk "
     "consistent", []),  # a stray file that is neither recorded nor a disk is left alone
    ([], {}, {}, False, "verification failed: disk.0.0: missing; domain.xml: missing; vm.xml: missing",
     ["disk.0.0", "domain.xml", "vm.xml"]),
])  # fmt: skip
def test_verdict(present: list[str], digests: dict[str, str], checks: dict[str, ImageCheck], ok: bool,
                 message: str, bad: list[str]) -> None:
    result = verdict(7, RECORDED, present, digests, checks)
    assert (result.ok, result.message) == (ok, message)
    assert [f.file for f in result.files if not f.sha256_ok] == bad
    struct = result.to_struct()
    assert struct["OK"] is ok and struct["MESSAGE"] == message
    assert {f["FILE"] for f in struct["FILES"]} >= set(RECORDED)


def test_verdict_without_recorded_checksums() -> None:
    result = verdict(7, {}, ALL, GOOD, CHECK_OK)
    assert not result.ok and "no checksums recorded" in result.message


def test_files_to_read() -> None:
    assert files_to_read(RECORDED, ["vm.xml", "disk.0.0", "disk.3.0", "notes.txt"]) == ["disk.0.0", "disk.3.0",
                                                                                          "vm.xml"]


def test_the_outcome_is_recorded_on_a_copy() -> None:
    image = Image(id=3, name="b", type=ImageType.BACKUP)
    image.template.set("VERIFIED", "YES")
    after = recorded_on(image, Verification(False, "verification failed: vm.xml: missing"), 1700000000)
    assert [after.template.get(k) for k in ("VERIFIED", "VERIFY_TIME", "VERIFY_MESSAGE")] == [
        "NO", "1700000000", "verification failed: vm.xml: missing"]
    assert image.template.get("VERIFIED") == "YES" and image.template.get("VERIFY_TIME") is None


# --- the streaming reader ---------------------------------------------------------------------------------------

def fs_datastore(base: Path) -> Datastore:
    template = Template()
    template.set("BASE_PATH", str(base))
    return Datastore(id=1, name="fs", type=DatastoreType.BACKUP_DS, ds_mad="fs", template=template)


def rsync_datastore() -> Datastore:
    template = Template()
    for key, value in (("RSYNC_HOST", "backup.example"), ("RSYNC_USER", "bk"), ("RSYNC_PORT", "2222")):
        template.set(key, value)
    return Datastore(id=2, name="rs", type=DatastoreType.BACKUP_DS, ds_mad="rsync", template=template)


SSH = SshSettings(known_hosts=Path("/state/known_hosts"), key=Path("/state/id_ed25519"), connect_timeout=7)


def test_the_rsync_reader_runs_on_the_backup_server_with_our_host_keys() -> None:
    argv = reader_argv(rsync_datastore(), SSH, "/srv/b/6/8a3454/disk.0.0")
    assert argv[0] == "ssh" and argv[-3:-1] == ["--", "backup.example"]
    options = " ".join(argv[1:-3])
    for wanted in ("StrictHostKeyChecking=yes", "UserKnownHostsFile=/state/known_hosts",
                   "GlobalKnownHostsFile=/dev/null", "BatchMode=yes", "ConnectTimeout=7", "-p 2222", "-l bk",
                   "IdentitiesOnly=yes -i /state/id_ed25519"):
        assert wanted in options
    assert argv[-1].endswith("sh /srv/b/6/8a3454/disk.0.0")  # the path is a positional parameter


def test_the_restic_reader_is_a_dump_on_the_sftp_server_behind_a_size_line() -> None:
    template = Template()
    for key, value in (("RESTIC_SFTP_SERVER", "sftp.example"), ("RESTIC_SFTP_PORT", "2200"),
                       ("RESTIC_SFTP_USER", "bk"), ("RESTIC_PASSWORD", "pw")):
        template.set(key, value)
    datastore = Datastore(id=3, name="rc", type=DatastoreType.BACKUP_DS, ds_mad="restic", template=template)
    argv = reader_argv(datastore, SSH, "/srv/r/6/restic/disk.0.0", size_then(4096, ["restic", "dump", "x y"]))
    assert argv[-3:-1] == ["--", "sftp.example"] and "-p 2200 -l bk" in " ".join(argv)
    assert shlex.split(argv[-1])[-4:] == ["4096", "restic", "dump", "x y"]


@pytest.mark.parametrize(("ds_mad", "path", "error"), [
    ("ceph", "/srv/x/disk.0.0", ActionError),
    ("fs", "/srv/../etc/shadow", ValidationError),
    ("fs", "relative/disk.0.0", ValidationError),
])
def test_the_reader_refuses(ds_mad: str, path: str, error: type[Exception]) -> None:
    datastore = fs_datastore(Path("/srv"))
    datastore.ds_mad = ds_mad
    with pytest.raises(error):
        reader_argv(datastore, SSH, path)


async def test_an_fs_file_streams_with_its_size(tmp_path: Path) -> None:
    data = os.urandom(3 * (1 << 20) + 12345)
    (tmp_path / "disk.0.0").write_bytes(data)
    digest, received = hashlib.sha256(), 0
    async with open_stream(fs_datastore(tmp_path), SSH, str(tmp_path / "disk.0.0")) as stream:
        assert stream.size == len(data)
        async for chunk in stream.chunks():
            digest.update(chunk)
            received += len(chunk)
    assert received == len(data) and digest.hexdigest() == hashlib.sha256(data).hexdigest()


async def test_a_missing_file_and_a_reader_left_early(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="does not exist"):
        async with open_stream(fs_datastore(tmp_path), SSH, str(tmp_path / "disk.9.0")):
            pass
    (tmp_path / "disk.0.0").write_bytes(os.urandom(8 << 20))
    async with open_stream(fs_datastore(tmp_path), SSH, str(tmp_path / "disk.0.0")) as stream:
        async for _ in stream.chunks(1024):
            break
    assert stream.process.returncode is not None  # the reader is gone with the block


@pytest.mark.parametrize(("header", "session"), [
    ("Bearer alice:pw:with:colons", "alice:pw:with:colons"),
    ("bearer  bob:x ", "bob:x"),
    ("Basic YWxpY2U6cHc=", "alice:pw"),
])
def test_session_from_the_authorization_header(header: str, session: str) -> None:
    assert session_from(header) == session


@pytest.mark.parametrize("header", [None, "", "Bearer", "Token alice:pw", "Basic !!!", "Basic /w=="])
def test_no_usable_session(header: str | None) -> None:
    with pytest.raises(AuthError):
        session_from(header)
