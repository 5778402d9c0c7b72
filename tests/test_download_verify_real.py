"""Downloading a backed-up disk by its backup URL, and verifying a backup where it is stored, against the
real environment: a daemon, a TCG domain on host1, an ``fs`` datastore here and an ``rsync`` one on the backup
server (tests/test_backup_real.py's Setup).

URLs are written out here from the spec's grammar and the datastore layout, not by the code under test;
expected bytes are the backed-up files themselves (read from the datastores' directories, hashed here) and
``qemu-img compare``.
"""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from lxml import etree

from tests.conftest import REPO
from tests.realenv.domains import Hypervisor, TinyDomain
from tests.test_backup_real import Setup, backup_ids, same_image, setup, sha256  # noqa: F401  (setup: a fixture)

pytestmark = pytest.mark.realenv
CLI_WAIT = 60  # seconds


@dataclass
class Backup:
    ds_id: int
    vm_id: int
    image_id: int
    source: str
    directory: Path
    proto: str

    def url(self, disk: int = 0, source: str = "", base: Path | None = None) -> str:
        source = source or self.source
        base = base or self.directory.parent.parent
        return f"{self.proto}://{self.ds_id}//0:{source}/{base}/{self.vm_id}/{source}/disk.{disk}.0"


def take_backup(s: Setup, dom: TinyDomain, ds_id: int, proto: str) -> Backup:
    vm_id = s.api.import_one("host1", dom.name)
    ok, message = s.api.run_action(vm_id, "backup", f"{ds_id},0")
    assert ok, message
    [image_id] = backup_ids(s.api, vm_id)
    source = s.image(image_id).findtext("SOURCE") or ""
    base = s.fs_base if proto == "fs" else s.rsync_base
    return Backup(ds_id, vm_id, image_id, source, base / str(vm_id) / source, proto)


@pytest.fixture(params=["fs", "rsync"])
def backup(request: pytest.FixtureRequest, setup: Setup, tiny_domain: Callable[..., TinyDomain],  # noqa: F811
           hypervisors: Callable[[str], Hypervisor]) -> Backup:
    dom = tiny_domain("host1")
    hypervisors("host1").write_pattern(dom, "vda", pattern=0x5A, offset="2M", length="1M")
    ds_id = setup.fs_ds if request.param == "fs" else setup.rsync_ds
    return take_backup(setup, dom, ds_id, request.param)


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """An empty directory for downloads (tiny_domain keeps its disks in tmp_path)."""
    directory = tmp_path / "out"
    directory.mkdir()
    return directory


def vmsched(s: Setup, *argv: str, auth: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    env = dict(s.api.daemon.env, **({"VMSCHED_AUTH": str(auth)} if auth else {}))
    return subprocess.run([sys.executable, "-m", "scheduler", *argv], env=env, cwd=REPO, capture_output=True,
                          timeout=CLI_WAIT)


def http_get(s: Setup, url: str, session: str | None, scheme: str = "Bearer") -> tuple[int, dict[str, str], bytes]:
    page = s.api.daemon.endpoint.replace("/RPC2", "/download?" + urllib.parse.urlencode({"url": url}))
    request = urllib.request.Request(page)
    if session is not None:
        token = base64.b64encode(session.encode()).decode() if scheme == "Basic" else session
        request.add_header("Authorization", f"{scheme} {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, dict(reply.headers.items()), reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers.items()), exc.read()


def verified(s: Setup, image_id: int) -> tuple[str, str]:
    image = s.image(image_id)
    return image.findtext("TEMPLATE/VERIFIED") or "", image.findtext("TEMPLATE/VERIFY_MESSAGE") or ""


def test_download_by_url_gives_the_backed_up_disk(setup: Setup, backup: Backup, out: Path) -> None:  # noqa: F811
    s, b = setup, backup
    target = out / "vda.qcow2"
    cli = vmsched(s, "image", "download", b.url(0), "-o", str(target))
    assert cli.returncode == 0, cli.stderr.decode() + s.api.daemon.log()[-2000:]
    assert sha256(target) == sha256(b.directory / "disk.0.0")
    assert same_image(target, b.directory / "disk.0.0")
    assert b"verified" in cli.stdout
    assert [p.name for p in out.iterdir()] == ["vda.qcow2"]  # no temporary file left

    to_stdout = vmsched(s, "image", "download", b.url(1), "-o", "-")
    assert to_stdout.returncode == 0, to_stdout.stderr.decode()
    assert hashlib.sha256(to_stdout.stdout).hexdigest() == sha256(b.directory / "disk.1.0")

    status, headers, body = http_get(s, b.url(0), s.api.daemon.session, scheme="Basic")
    assert status == 200 and int(headers["Content-Length"]) == len(body) == (b.directory / "disk.0.0").stat().st_size
    assert headers["X-Vmsched-Image-Id"] == str(b.image_id)


def test_verify_a_sound_backup(setup: Setup, backup: Backup) -> None:  # noqa: F811
    s, b = setup, backup
    result = s.api.call("vmsched.image.verify", b.image_id, -1)
    assert isinstance(result, dict) and result["OK"] is True, result
    files = {f["FILE"]: (f["SHA256_OK"], f["CHECK"]) for f in result["FILES"]}
    assert files == {"disk.0.0": (True, "ok"), "disk.1.0": (True, "ok"), "domain.xml": (True, "-"),
                     "vm.xml": (True, "-")}
    assert verified(s, b.image_id) == ("YES", result["MESSAGE"])
    assert int(s.image(b.image_id).findtext("TEMPLATE/VERIFY_TIME") or "0") > 0
    cli = vmsched(s, "image", "verify", str(b.image_id))
    assert cli.returncode == 0, cli.stderr.decode()
    assert b"VERIFIED: YES" in cli.stdout and b"disk.1.0" in cli.stdout
    assert s.api.call("vmsched.image.verify", b.image_id, 0)["OK"] is True  # type: ignore[index]  # the full one
    assert "increment 1 is not in the chain" in s.api.failure("vmsched.image.verify", b.image_id, 1)


def test_a_corrupt_or_missing_file_fails_verification(setup: Setup, backup: Backup, out: Path) -> None:  # noqa: F811
    s, b = setup, backup
    disk = b.directory / "disk.0.0"
    with disk.open("r+b") as file:  # one byte in the guest data written before the backup
        file.seek(disk.stat().st_size // 2)
        byte = file.read(1)
        file.seek(-1, 1)
        file.write(bytes([byte[0] ^ 0xFF]))
    result = s.api.call("vmsched.image.verify", b.image_id, -1)
    assert isinstance(result, dict) and result["OK"] is False
    assert [f["FILE"] for f in result["FILES"] if not f["SHA256_OK"]] == ["disk.0.0"]
    state, message = verified(s, b.image_id)
    assert state == "NO" and "disk.0.0: sha256 mismatch" in message and "disk.1.0" not in message
    cli = vmsched(s, "image", "verify", str(b.image_id))
    assert cli.returncode == 1 and b"VERIFIED: NO" in cli.stdout and b"BAD" in cli.stdout

    target = out / "vda.qcow2"
    download = vmsched(s, "image", "download", b.url(0), "-o", str(target))
    assert download.returncode == 1 and b"differs from the" in download.stderr
    assert list(out.iterdir()) == []  # the bad copy was removed

    (b.directory / "vm.xml").unlink()
    result = s.api.call("vmsched.image.verify", b.image_id, -1)
    assert isinstance(result, dict) and result["OK"] is False
    assert {f["FILE"]: f["CHECK"] for f in result["FILES"]}["vm.xml"] == "missing"
    assert "vm.xml: missing" in verified(s, b.image_id)[1]


def test_download_errors(setup: Setup, tiny_domain: Callable[..., TinyDomain], out: Path) -> None:  # noqa: F811
    s = setup
    b = take_backup(s, tiny_domain("host1"), s.fs_ds, "fs")
    target = out / "disk"

    bad = vmsched(s, "image", "download", "http://example.com/disk.0.0", "-o", str(target))
    assert bad.returncode == 2 and b"not a backup URL" in bad.stderr
    unknown = vmsched(s, "image", "download", b.url(0, source="abcdef"), "-o", str(target))
    assert unknown.returncode == 1 and b"no backup image" in unknown.stderr
    elsewhere = vmsched(s, "image", "download", b.url(0, base=Path("/etc")), "-o", str(target))
    assert elsewhere.returncode == 1 and b"is not one of image" in elsewhere.stderr
    chain = b.url(0).replace(f"0:{b.source}", f"0:{b.source},1:abcdef").replace("disk.0.0", "disk.0.1")
    assert vmsched(s, "image", "download", chain, "-o", str(target)).returncode == 1

    s.api.call("one.user.allocate", "dluser", "dlpass", "core", [])
    auth = out.parent / "dluser_auth"
    auth.write_text("dluser:dlpass\n")
    denied = vmsched(s, "image", "download", b.url(0), "-o", str(target), auth=auth)
    assert denied.returncode == 1 and b"Not authorized" in denied.stderr
    assert list(out.iterdir()) == []

    assert http_get(s, b.url(0), None)[0] == 401
    assert http_get(s, b.url(0), "dluser:wrong")[0] == 401
    assert http_get(s, b.url(0), "dluser:dlpass")[0] == 403
    assert http_get(s, "rsync://1//x", s.api.daemon.session)[0] == 400
    status, _, body = http_get(s, b.url(3), s.api.daemon.session)
    assert status == 404 and b"is not one of image" in body
    (b.directory / "disk.1.0").unlink()
    status, _, body = http_get(s, b.url(1), s.api.daemon.session)
    assert status == 404 and b"does not exist" in body


def test_an_unreachable_backup_server(setup: Setup, tiny_domain: Callable[..., TinyDomain],  # noqa: F811
                                      out: Path) -> None:
    s, server = setup, setup.realenv.backup
    ds_id = s.datastore(
        f'NAME = "rsync-gone"\nTYPE = "BACKUP_DS"\nDS_MAD = "rsync"\nBASE_PATH = "{s.rsync_base}"\n'
        f'RSYNC_HOST = "{server.address}"\nRSYNC_USER = "{server.user}"\nRSYNC_PORT = "{server.ssh_port}"')
    b = take_backup(s, tiny_domain("host1"), ds_id, "rsync")
    s.api.call("one.datastore.update", ds_id, 'RSYNC_PORT = "1"', 1)  # nothing listens there
    status, _, body = http_get(s, b.url(0), s.api.daemon.session)
    assert status == 502 and b"cannot reach the backup server" in body
    cli = vmsched(s, "image", "download", b.url(0), "-o", str(out / "x"))
    assert cli.returncode == 1 and b"HTTP 502" in cli.stderr and list(out.iterdir()) == []
    assert "connect" in s.api.failure("vmsched.image.verify", b.image_id, -1).lower()
    assert etree.fromstring(str(s.api.call("one.image.info", b.image_id)).encode()).findtext(
        "TEMPLATE/VERIFIED") is None  # an unreachable server proves nothing either way
