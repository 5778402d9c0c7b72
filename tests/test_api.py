"""The XML-RPC API through pyone, as OpenNebula scripts would use it, against a real daemon."""

from __future__ import annotations

import xmlrpc.client
from pathlib import Path

import pyone
import pytest

from tests import xsd
from tests.conftest import Daemon, start_daemon

VM_TEMPLATE = """
NAME = "web"
CPU = 1
MEMORY = 64
DISK = [ SOURCE = "/var/lib/vms/web.qcow2", FORMAT = "qcow2", TYPE = "FILE", TARGET = "vda" ]
DISK = [ SOURCE = "/var/lib/vms/web-data.raw", FORMAT = "raw", TYPE = "FILE", TARGET = "vdb" ]
NIC = [ MAC = "02:00:0a:00:00:01", BRIDGE = "br0", MODEL = "virtio" ]
OS = [ UUID = "8f4b9d6c-5b0e-4c53-9a43-2d1f0f1f6e01" ]
BACKUP_CONFIG = [ KEEP_LAST = "3", FS_FREEZE = "agent", MODE = "FULL" ]
OWNER_NOTE = "kept in USER_TEMPLATE"
"""

BACKUP_DS = 'NAME = "backups"\nTYPE = "BACKUP_DS"\nDS_MAD = "restic"\nRESTIC_PASSWORD = "s3cret-pw"\n'


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory):
    running = start_daemon(tmp_path_factory.mktemp("api") / "state")
    yield running
    assert running.stop() == 0
    assert "Traceback" not in running.log()


@pytest.fixture
def admin(shared: Daemon) -> pyone.OneServer:
    return pyone.OneServer(shared.endpoint, session=shared.session, timeout=30)


def raw_call(daemon: Daemon, method: str, *args: object) -> list:
    with xmlrpc.client.ServerProxy(daemon.endpoint) as proxy:
        return getattr(proxy, method)(*args)


def test_version(admin: pyone.OneServer) -> None:
    assert admin.system.version() == "7.0.0"


def test_vm_lifecycle_and_xml_validates(admin: pyone.OneServer, shared: Daemon) -> None:
    xsd.require_schemas()
    host_id = admin.host.allocate("kvm-lifecycle", "kvm", "kvm", -1)
    admin.host.update(host_id, 'SSH_HOST = "127.0.0.1"\nSSH_PORT = "2222"\nSSH_USER = "root"', 1)
    vm_id = admin.vm.allocate(VM_TEMPLATE, False)
    vm = admin.vm.info(vm_id)
    assert vm.NAME == "web"
    assert vm.STATE == 1 and vm.LCM_STATE == 0  # PENDING: not bound to a host yet
    assert vm.TEMPLATE["OS"]["UUID"] == "8f4b9d6c-5b0e-4c53-9a43-2d1f0f1f6e01"
    assert [d["DISK_ID"] for d in vm.TEMPLATE["DISK"]] == ["0", "1"]
    assert vm.USER_TEMPLATE["OWNER_NOTE"] == "kept in USER_TEMPLATE"
    assert vm.BACKUPS.BACKUP_CONFIG.KEEP_LAST == "3"
    assert vm.BACKUPS.BACKUP_CONFIG.FS_FREEZE == "AGENT"

    admin.vm.deploy(vm_id, host_id)
    vm = admin.vm.info(vm_id)
    assert (vm.STATE, vm.LCM_STATE) == (3, 3)
    assert vm.HISTORY_RECORDS.HISTORY[0].HOSTNAME == "kvm-lifecycle"
    assert vm_id in admin.host.info(host_id).VMS.ID

    with xmlrpc.client.ServerProxy(shared.endpoint) as proxy:
        session = shared.session
        for method, args, schema in [
            ("one.vm.info", (vm_id,), "vm"),
            ("one.vmpool.info", (-2, -1, -1, -1), "vm_pool"),
            ("one.vmpool.infoextended", (-2, -1, -1, -1), "vm_pool_extended"),
            ("one.host.info", (host_id,), "host"),
            ("one.hostpool.info", (), "host_pool"),
            ("one.user.info", (0,), "user"),
            ("one.userpool.info", (), "user_pool"),
            ("one.datastorepool.info", (), "datastore_pool"),
            ("one.imagepool.info", (-2, -1, -1), "image_pool"),
        ]:
            ok, body, code = getattr(proxy, method)(session, *args)[:3]
            assert ok, body
            xsd.validate(body, schema)

    admin.vm.rename(vm_id, "web-renamed")
    admin.vm.update(vm_id, 'LABEL = "gold"', 1)
    vm = admin.vm.info(vm_id)
    assert vm.NAME == "web-renamed" and vm.USER_TEMPLATE["LABEL"] == "gold"
    assert vm.USER_TEMPLATE["OWNER_NOTE"] == "kept in USER_TEMPLATE"

    admin.vm.updateconf(vm_id, "BACKUP_CONFIG = [ KEEP_LAST = 7 ]", 1)
    config = admin.vm.info(vm_id).BACKUPS.BACKUP_CONFIG
    assert (config.KEEP_LAST, config.FS_FREEZE) == ("7", "AGENT")

    admin.vm.recover(vm_id, 3)
    with pytest.raises(pyone.OneNoExistsException):
        admin.vm.info(vm_id)
    assert vm_id not in (admin.host.info(host_id).VMS.ID or [])
    admin.host.delete(host_id)


def test_datastore_secret_is_masked(admin: pyone.OneServer, shared: Daemon) -> None:
    ds_id = admin.datastore.allocate(BACKUP_DS.replace("backups", "masked"), -1)
    ds = admin.datastore.info(ds_id)
    assert ds.TYPE == 3 and ds.TM_MAD == "-"
    assert ds.TEMPLATE["RESTIC_PASSWORD"] != "s3cret-pw"
    assert admin.datastore.info(ds_id, True).TEMPLATE["RESTIC_PASSWORD"] == "s3cret-pw"
    ok, pool, _ = raw_call(shared, "one.datastorepool.info", shared.session)[:3]
    assert ok and "s3cret-pw" not in pool
    if xsd.SCHEMA_DIR.exists():
        xsd.validate(raw_call(shared, "one.datastore.info", shared.session, ds_id)[1], "datastore")
    admin.datastore.delete(ds_id)


@pytest.mark.parametrize(
    ("method", "args", "code", "fragment"),
    [
        ("one.vm.info", (424242,), 0x400, "Error getting virtual machine [424242]"),
        ("one.host.info", (424242,), 0x400, "Error getting host [424242]"),
        ("one.vm.info", ("seven",), 0x1000, "argument 2 (id) must be int, got string"),
        ("one.vm.info", (), 0x1000, "expected 1 to 2 argument(s) after the session, got 0"),
        ("one.vm.info", (1, False, 3), 0x1000, "expected 1 to 2 argument(s) after the session, got 3"),
        ("one.vm.allocate", ('NAME = "x"\nDISK = [ A = 1',), 0x2000, "VM template:2:15: vector DISK is not closed"),
        ("one.vm.allocate", ("<TEMPLATE><NAME>x</TEMPLATE>",), 0x2000, "malformed XML"),
        ("one.datastore.allocate", ('NAME = "d"\nTYPE = "BACKUP_DS"\nDS_MAD = "rsync"',), 0x2000,
         "datastore driver rsync needs the attribute RSYNC_HOST"),
        ("one.datastore.allocate", ('NAME = "d"\nTYPE = "NOPE"\nDS_MAD = "fs"',), 0x2000, "NOPE"),
        ("one.host.allocate", ("",), 0x2000, "host name cannot be empty"),
        ("one.host.status", (0, 9), 0x2000, "host status must be 0 (enabled), 1 (disabled) or 2 (offline)"),
        ("one.vm.recover", (0, 1), 0x2000, "recover operation 1 is not supported"),
        ("one.vmpool.info", (-9, -1, -1, -1), 0x2000, "filter flag must be -3, -2, -1 or a user id"),
    ],
)
def test_bad_requests_get_clear_errors(shared: Daemon, method: str, args: tuple, code: int, fragment: str) -> None:
    reply = raw_call(shared, method, shared.session, *args)
    assert reply[0] is False
    assert fragment in reply[1]
    assert reply[1].startswith(f"[{method}]")
    assert reply[2] == code


def test_duplicate_names_are_refused(admin: pyone.OneServer, shared: Daemon) -> None:
    first = admin.host.allocate("dup-host")
    reply = raw_call(shared, "one.host.allocate", shared.session, "dup-host")
    assert reply[0] is False and f"NAME is already taken by HOST {first}" in reply[1]
    assert [h.NAME for h in admin.hostpool.info().HOST].count("dup-host") == 1
    admin.host.delete(first)


def test_unknown_method_and_garbage_keep_the_daemon_serving(shared: Daemon) -> None:
    proxy = xmlrpc.client.ServerProxy(shared.endpoint)
    with pytest.raises(xmlrpc.client.Fault, match="Unknown method"):
        proxy.one.nothing.here(shared.session)
    import urllib.request

    for body in (b"", b"<methodCall>", b"\x00\xff garbage", b"<?xml version='1.0'?><methodCall><methodName/></methodCall>"):
        request = urllib.request.Request(shared.endpoint, data=body, headers={"Content-Type": "text/xml"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert b"<fault>" in response.read()
    assert raw_call(shared, "one.system.version", shared.session)[1] == "7.0.0"


def test_oversize_request_is_refused(tmp_path: Path) -> None:
    small = start_daemon(tmp_path / "state", "MESSAGE_SIZE = 65536\n")
    try:
        reply = raw_call(small, "one.vm.allocate", small.session, "NAME = x\nA = \"" + "x" * 70_000 + '"')
        pytest.fail(f"accepted: {reply}")
    except xmlrpc.client.ProtocolError as exc:
        assert exc.errcode == 413
    finally:
        assert small.stop() == 0
    assert "Traceback" not in small.log()


def test_authentication(shared: Daemon) -> None:
    for session in ("oneadmin:wrong", "nobody:x", "no-colon", "", ":pw"):
        reply = raw_call(shared, "one.vmpool.info", session, -2, -1, -1, -1)
        assert reply[0] is False and reply[2] == 0x100, reply
    reply = raw_call(shared, "one.vmpool.info", 42, -2, -1, -1, -1)
    assert reply[0] is False and reply[2] == 0x100


def test_users_see_and_change_only_their_own(admin: pyone.OneServer, shared: Daemon) -> None:
    admin.user.allocate("carol", "carol-pw", "core", [])
    carol = pyone.OneServer(shared.endpoint, session="carol:carol-pw")
    mine = carol.vm.allocate('NAME = "carol-vm"')
    theirs = admin.vm.allocate('NAME = "admin-vm"')
    assert carol.vm.info(mine).UNAME == "carol"
    with pytest.raises(pyone.OneAuthorizationException):
        carol.vm.info(theirs)
    with pytest.raises(pyone.OneAuthorizationException):
        carol.vm.rename(theirs, "stolen")
    assert [vm.ID for vm in carol.vmpool.info(-2, -1, -1, -1).VM] == [mine]
    for forbidden in (lambda: carol.host.allocate("h"), lambda: carol.hostpool.info(),
                      lambda: carol.user.allocate("eve", "x"), lambda: carol.vm.recover(mine, 3)):
        with pytest.raises(pyone.OneAuthorizationException):
            forbidden()
    ds_id = admin.datastore.allocate(BACKUP_DS.replace("backups", "carol-sees"), -1)
    assert carol.datastore.info(ds_id, True).TEMPLATE["RESTIC_PASSWORD"] != "s3cret-pw"
    with pytest.raises(pyone.OneAuthorizationException):
        carol.user.info(0)
    assert carol.user.info(-1).NAME == "carol"
    # A password change ends the old sessions at once, cached or not.
    carol.user.passwd(-1, "new-pw")
    with pytest.raises(pyone.OneAuthenticationException):
        carol.vm.info(mine)
    assert pyone.OneServer(shared.endpoint, session="carol:new-pw").vm.info(mine).NAME == "carol-vm"
    assert "new-pw" not in raw_call(shared, "one.userpool.info", shared.session)[1]


def test_state_survives_restart_and_ids_are_not_reused(daemon: Daemon) -> None:
    one = pyone.OneServer(daemon.endpoint, session=daemon.session)
    first = one.vm.allocate('NAME = "a"')
    second = one.vm.allocate('NAME = "b"')
    one.vm.recover(second, 3)
    assert daemon.stop() == 0
    again = start_daemon(daemon.state_dir)
    try:
        assert again.session == daemon.session  # oneadmin is created once
        one = pyone.OneServer(again.endpoint, session=again.session)
        assert one.vm.info(first).NAME == "a"
        assert one.vm.allocate('NAME = "c"') == second + 1
    finally:
        assert again.stop() == 0
    daemon.process = again.process


def test_auth_file_is_private(daemon: Daemon) -> None:
    assert daemon.auth_file.stat().st_mode & 0o777 == 0o600
    user, password = daemon.session.split(":", 1)
    assert user == "oneadmin" and len(password) >= 20
    assert password not in daemon.log()


def test_unix_socket_serves_the_same_api(tmp_path: Path) -> None:
    import asyncio

    import aiohttp

    socket_path = tmp_path / "api.sock"
    running = start_daemon(tmp_path / "state", f'LISTEN = [ ADDRESS = "127.0.0.1", PORT = "0", UNIX_SOCKET = "{socket_path}" ]\n')
    try:
        assert socket_path.stat().st_mode & 0o777 == 0o660

        async def call() -> bytes:
            body = xmlrpc.client.dumps((running.session,), "one.system.version").encode()
            async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(socket_path))) as client:
                async with client.post("http://localhost/RPC2", data=body) as response:
                    return await response.read()

        ok, version, code = xmlrpc.client.loads(asyncio.run(call()))[0][0]
        assert (ok, version, code) == (True, "7.0.0", 0)
    finally:
        assert running.stop() == 0
