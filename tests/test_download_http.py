"""``GET /download`` in process: statuses, headers and body for an ``fs`` datastore in a temporary directory
(real files read by the real reader process), and a client that leaves halfway.

The daemon's object pools are stood in for by two lists; tests/test_download_verify_real.py runs the same
route in a real daemon against real backups.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from drivers.ssh import SshSettings
from scheduler.api.download import download_handler
from scheduler.api.permissions import Caller
from scheduler.backup.urls import disk_urls
from scheduler.errors import AuthError
from scheduler.model.objects.common import Ownership
from scheduler.model.objects.datastore import Datastore
from scheduler.model.objects.image import Image
from scheduler.model.objects.states import DatastoreType, ImageType
from scheduler.model.template import Template

USERS = {"admin:pw": Caller(0, "oneadmin", 0, frozenset({0})), "alice:pw": Caller(5, "alice", 1, frozenset({1})),
         "bob:pw": Caller(6, "bob", 1, frozenset({1}))}
DISK = os.urandom(2 * (1 << 20) + 7)


class Pool:
    def __init__(self, objects: list[object]) -> None:
        self.objects = objects

    def all(self) -> list[object]:
        return list(self.objects)


class Pools:
    def __init__(self, images: list[Image], datastores: list[Datastore]) -> None:
        self.images, self.datastores = Pool(images), Pool(datastores)


async def authenticate(session: str) -> Caller:
    if session not in USERS:
        raise AuthError("[one.auth] User couldn't be authenticated, aborting call.")
    return USERS[session]


@pytest.fixture
def backup(tmp_path: Path) -> tuple[Image, Datastore]:
    template = Template()
    template.set("BASE_PATH", str(tmp_path))
    datastore = Datastore(id=100, name="fs", type=DatastoreType.BACKUP_DS, ds_mad="fs", template=template)
    image = Image(id=4, name="6 backup", type=ImageType.BACKUP, source="8a3454", datastore_id=100, vms=[6],
                  backup_disk_ids=[0, 1], ownership=Ownership(5, 1, "alice", "users"))
    directory = tmp_path / "6" / "8a3454"
    directory.mkdir(parents=True)
    (directory / "disk.0.0").write_bytes(DISK)
    (directory / "disk.1.0").write_bytes(b"")
    return image, datastore


@pytest.fixture
async def client(backup: tuple[Image, Datastore], tmp_path: Path) -> AsyncIterator[TestClient]:
    image, datastore = backup
    ctx = SimpleNamespace(state=Pools([image], [datastore]), links=SimpleNamespace(
        settings=SshSettings(known_hosts=tmp_path / "known_hosts"), pool=None))  # an fs datastore needs no pool
    app = web.Application()
    app.router.add_get("/download", download_handler(authenticate, ctx))
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


def bearer(session: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {session}"}


async def test_the_owner_and_an_administrator_get_the_disk(client: TestClient,
                                                           backup: tuple[Image, Datastore]) -> None:
    urls = disk_urls(*backup)
    for session in ("alice:pw", "admin:pw"):
        reply = await client.get("/download", params={"url": urls[0]}, headers=bearer(session))
        assert reply.status == 200
        body = await reply.read()
        assert hashlib.sha256(body).digest() == hashlib.sha256(DISK).digest()
        assert reply.headers["Content-Length"] == str(len(DISK))
        assert reply.headers["X-Vmsched-Image-Id"] == "4"
        assert reply.headers["Content-Disposition"] == 'attachment; filename="disk.0.0"'
    empty = await client.get("/download", params={"url": urls[1]}, headers=bearer("alice:pw"))
    assert (empty.status, await empty.read(), empty.headers["Content-Length"]) == (200, b"", "0")


@pytest.mark.parametrize(("session", "url", "status", "text"), [
    (None, "disk0", 401, "no session"),
    ("alice:wrong", "disk0", 401, "couldn't be authenticated"),
    ("bob:pw", "disk0", 403, "Not authorized to perform USE download on IMAGE [4]"),
    ("alice:pw", "", 400, "give the backup URL"),
    ("alice:pw", "rsync://100//nochain//x/disk.0.0", 400, "bad chain element"),
    ("alice:pw", "fs://100//0:8a3454//elsewhere/6/8a3454/disk.0.0", 404, "is not one of image 4's URLs"),
    ("alice:pw", "fs://100//0:bbbbbb//x/6/bbbbbb/disk.0.0", 404, "no backup image"),
])  # fmt: skip
async def test_refusals(client: TestClient, backup: tuple[Image, Datastore], session: str | None, url: str,
                        status: int, text: str) -> None:
    url = disk_urls(*backup)[0] if url == "disk0" else url
    reply = await client.get("/download", params={"url": url}, headers=bearer(session) if session else {})
    assert reply.status == status
    assert text in await reply.text()


async def test_a_file_gone_from_the_datastore(client: TestClient, backup: tuple[Image, Datastore],
                                              tmp_path: Path) -> None:
    (tmp_path / "6" / "8a3454" / "disk.1.0").unlink()
    reply = await client.get("/download", params={"url": disk_urls(*backup)[1]}, headers=bearer("alice:pw"))
    assert reply.status == 404 and "does not exist" in await reply.text()


def readers_of(path: Path) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if str(path).encode() in cmdline and b"cat" in cmdline:
            found.append(int(pid))
    return found


async def test_a_client_that_leaves_stops_the_reader(client: TestClient, backup: tuple[Image, Datastore],
                                                     tmp_path: Path) -> None:
    disk = tmp_path / "6" / "8a3454" / "disk.0.0"
    with disk.open("r+b") as file:
        file.truncate(1 << 30)  # sparse: far more than the socket and pipe buffers hold
    reply = await client.get("/download", params={"url": disk_urls(*backup)[0]}, headers=bearer("alice:pw"))
    assert reply.status == 200 and int(reply.headers["Content-Length"]) == 1 << 30
    await reply.content.readexactly(1 << 20)
    assert readers_of(disk)  # still streaming
    reply.close()
    for _ in range(500):  # 10 s at most: the handler notices the closed connection at its next write
        if not readers_of(disk):
            break
        await asyncio.sleep(0.02)
    assert readers_of(disk) == []
