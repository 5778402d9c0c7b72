"""The README's run path: ``vmsched serve`` on its built-in defaults sets up the demo on this machine's
libvirt (started with ``scripts/local-libvirt``) and the first backup completes at once.

A daemon on built-in defaults listens on 127.0.0.1:2633; each runs in a network namespace of its own so
that port is free, and the CLI reaches it with ``nsenter --net``. Expected values come from outside the
code under test: files are listed and hashed here, the domain is read from libvirt here.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest
from lxml import etree

from scheduler.daemon import demo
from tests.conftest import REPO, Daemon, _wait_for_listening, start_daemon

pytestmark = pytest.mark.realenv
SCRIPT = REPO / "scripts" / "local-libvirt"
ENDPOINT = "http://127.0.0.1:2633/RPC2"  # the built-in default, inside the daemon's network namespace
WAIT = 30.0  # seconds: a demo's set-up and first backup take about 1 s
NETNS_SHELL = 'ip link set lo up && exec "$@"'
NO_LIBVIRT_SHELL = 'mount -t tmpfs vmsched-test /run/libvirt && ' + NETNS_SHELL  # no libvirt socket in there
QUERY = """\
import json, sys, xmlrpc.client
endpoint, session, calls = sys.argv[1], open(sys.argv[2]).read().strip(), json.loads(sys.argv[3])
proxy = xmlrpc.client.ServerProxy(endpoint)
answers = []
for name, args in calls:
    ok, value, *_ = getattr(proxy, name)(session, *args)
    assert ok, value
    answers.append(value)
print(json.dumps(answers))
"""


# -- pure parts ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("conf", "user"), [
    (None, "libvirt-qemu"),
    ("", "libvirt-qemu"),
    ('#user = "root"\n', "libvirt-qemu"),
    ('user = "root"\ngroup = "root"\n', "root"),
    ('user = "qemu"\nuser = "+0"\n', "+0"),
])
def test_qemu_user_from_qemu_conf(conf: str | None, user: str) -> None:
    assert demo.qemu_user(conf) == user


@pytest.mark.parametrize(("mode", "owner", "group", "uid", "gids", "enters"), [
    (0o700, 0, 0, 0, {0}, True),  # root passes everywhere
    (0o700, 0, 0, 999, {994}, False),
    (0o710, 0, 994, 999, {994}, True),  # group search bit, QEMU in that group
    (0o710, 0, 0, 999, {994}, False),
    (0o701, 0, 0, 999, {994}, True),
    (0o100, 999, 0, 999, {994}, True),  # owner's bit
    (0o011, 999, 994, 999, {994}, False),  # the owner's bit decides for the owner
])
def test_can_enter(mode: int, owner: int, group: int, uid: int, gids: set[int], enters: bool) -> None:
    assert demo.can_enter(mode | stat.S_IFDIR, owner, group, uid, gids) is enters


def test_domain_name_is_per_state_dir_and_the_xml_names_its_disks(tmp_path: Path) -> None:
    first, second = demo.domain_name(tmp_path / "a"), demo.domain_name(tmp_path / "b")
    assert first.startswith(demo.DOMAIN_PREFIX) and first != second == demo.domain_name(tmp_path / "b")
    disks = demo.disk_paths(tmp_path)
    assert disks == {"vda": tmp_path / "demo" / "vda.qcow2", "vdb": tmp_path / "demo" / "vdb.raw"}
    xml = demo.domain_xml(first, disks)
    assert demo.disk_sources(xml) == disks
    assert etree.fromstring(xml.encode()).get("type") == "qemu"  # TCG: no /dev/kvm needed


# -- the local libvirt and daemons --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_libvirt() -> Iterator[libvirt.virConnect]:
    """This machine's libvirtd through scripts/local-libvirt; stopped again only if this module started it."""
    answered = subprocess.run([str(SCRIPT), "status"], capture_output=True, timeout=60).returncode == 0
    up = subprocess.run([str(SCRIPT), "up"], capture_output=True, text=True, timeout=300)
    assert up.returncode == 0, up.stdout + up.stderr
    again = subprocess.run([str(SCRIPT), "up"], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "nothing to start" in again.stdout  # idempotent
    libvirt.registerErrorHandler(lambda *_: None, None)
    conn = libvirt.open("qemu:///system")
    yield conn
    conn.close()
    if not answered:
        down = subprocess.run([str(SCRIPT), "down"], capture_output=True, text=True, timeout=60)
        assert down.returncode == 0, down.stdout + down.stderr


@pytest.fixture
def state_dir(tmp_path: Path, local_libvirt: libvirt.virConnect) -> Iterator[Path]:
    """A fresh state dir; the demo domain made for it is destroyed and undefined afterwards."""
    state = tmp_path / "state"
    yield state
    try:
        dom = local_libvirt.lookupByName(demo.domain_name(state))
    except libvirt.libvirtError:
        return
    if dom.isActive():
        dom.destroy()
    dom.undefine()


def serve_in_netns(state: Path, *flags: str, libvirt_socket: bool = True) -> Daemon:
    """``vmsched serve --state-dir STATE FLAGS`` on built-in defaults (no sched.conf), in a new netns;
    without ``libvirt_socket`` also in a mount namespace whose /run/libvirt is empty."""
    state.mkdir(parents=True, exist_ok=True)
    assert not (state / "sched.conf").exists()
    log_file = state / "daemon.log"
    namespaces = ["--net"] if libvirt_socket else ["--net", "--mount"]
    argv = ["unshare", *namespaces, "sh", "-c", NETNS_SHELL if libvirt_socket else NO_LIBVIRT_SHELL, "sh",
            sys.executable, "-m", "scheduler", "serve", "--state-dir", str(state), *flags]
    with log_file.open("a") as log:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO,
                                   env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert _wait_for_listening(process, log_file, WAIT) == ENDPOINT
    env = dict(os.environ, VMSCHED_ENDPOINT=ENDPOINT, VMSCHED_AUTH=str(state / "one_auth"), HOME=str(state))
    return Daemon(state, process, ENDPOINT, state / "one_auth", env, log_file)


def run_near(daemon: Daemon, argv: list[str]) -> str:
    """Run ``argv`` from inside the daemon's network namespace when it has one; its output."""
    if daemon.endpoint == ENDPOINT:
        argv = ["nsenter", f"--net=/proc/{daemon.process.pid}/ns/net", "--", *argv]
    done = subprocess.run(argv, env=daemon.env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr + daemon.log()[-3000:]
    return done.stdout


def cli(daemon: Daemon, *args: str) -> str:
    """The vmsched command against ``daemon``."""
    return run_near(daemon, [sys.executable, "-m", "scheduler", *args])


def query(daemon: Daemon, *calls: tuple[str, list[Any]]) -> list[etree._Element]:
    """XML-RPC calls as oneadmin, in one small process; the XML documents they answer."""
    out = run_near(daemon, [sys.executable, "-c", QUERY, daemon.endpoint, str(daemon.auth_file), json.dumps(calls)])
    return [xml(text) for text in json.loads(out)]


def wait_for_log(daemon: Daemon, text: str) -> None:
    deadline = time.monotonic() + WAIT
    while text not in daemon.log():
        assert daemon.process.poll() is None, daemon.log()
        assert time.monotonic() < deadline, f"no {text!r} in the log:\n{daemon.log()}"
        time.sleep(0.05)


def stop(daemon: Daemon) -> str:
    assert daemon.stop(signal.SIGTERM) == 0, daemon.log()
    log = daemon.log()
    assert "Traceback" not in log, log
    return log


def xml(text: str) -> etree._Element:
    return etree.fromstring(text.encode())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- the demo -----------------------------------------------------------------------------------------------


def test_first_start_backs_up_the_demo_vm_and_a_restart_creates_nothing(
        state_dir: Path, local_libvirt: libvirt.virConnect) -> None:
    daemon = serve_in_netns(state_dir)
    try:
        wait_for_log(daemon, "run 1: backup succeeded")
        wait_for_log(daemon, "demo: ready")
        shown = cli(daemon, "vm", "show", "0")
        vm, host, datastore, images = query(daemon, ("one.vm.info", [0]), ("one.host.info", [0]),
                                            ("one.datastore.info", [0]), ("one.imagepool.info", [-2, -1, -1]))
    finally:
        first_log = stop(daemon)

    [image_id] = [i.text for i in vm.iterfind("BACKUPS/BACKUP_IDS/ID")]
    [image] = images.findall("IMAGE")
    assert image.findtext("ID") == image_id and image.findtext("DATASTORE_ID") == "0"
    assert f"IMAGE IDS: {image_id}\n" in shown and "Hourly" in shown and "backup" in shown
    assert (host.findtext("NAME"), host.findtext("TEMPLATE/SSH_HOST")) == ("localhost", None)
    assert host.findtext("TEMPLATE/VMSCHED_DEMO") == "DONE"
    assert (datastore.findtext("NAME"), datastore.findtext("TEMPLATE/DS_MAD")) == ("demo-backups", "fs")
    assert datastore.findtext("TEMPLATE/BASE_PATH") == str(state_dir / "backups")
    assert (vm.findtext("BACKUPS/BACKUP_CONFIG/KEEP_LAST"), vm.findtext("BACKUPS/BACKUP_CONFIG/FS_FREEZE")) == (
        "3", "NONE")
    [action] = vm.findall("TEMPLATE/SCHED_ACTION")
    assert [action.findtext(k) for k in ("ACTION", "ARGS", "REPEAT", "DAYS")] == ["backup", "0", "3", "1"]
    assert int(action.findtext("TIME") or 0) - int(vm.findtext("STIME") or 0) >= 3600  # the next hour is due

    directory = state_dir / "backups" / "0" / (image.findtext("SOURCE") or "?")
    assert sorted(p.name for p in directory.iterdir()) == ["disk.0.0", "disk.1.0", "domain.xml", "vm.xml"]
    sums = {c.findtext("FILE"): c.findtext("SHA256") for c in image.iterfind("TEMPLATE/CHECKSUMS")}
    assert sums == {p.name: sha256(p) for p in directory.iterdir()}

    name = demo.domain_name(state_dir)
    dom = local_libvirt.lookupByName(name)
    assert dom.isActive() and dom.UUIDString() == vm.findtext("TEMPLATE/OS/UUID")
    assert demo.disk_sources(dom.XMLDesc()) == demo.disk_paths(state_dir)
    assert [line for line in first_log.splitlines() if "demo: not set up" in line] == []

    again = serve_in_netns(state_dir)
    try:
        wait_for_log(again, "demo: already set up: VM 0")
        hosts, vms, vm, datastores, images = query(
            again, ("one.hostpool.info", []), ("one.vmpool.info", [-2, -1, -1, -1]), ("one.vm.info", [0]),
            ("one.datastorepool.info", []), ("one.imagepool.info", [-2, -1, -1]))
    finally:
        stop(again)
    assert [h.findtext("NAME") for h in hosts.findall("HOST")] == ["localhost"]
    assert [v.findtext("ID") for v in vms.findall("VM")] == ["0"]
    assert [a.findtext("ID") for a in vm.iterfind("TEMPLATE/SCHED_ACTION")] == ["0"]
    assert [d.findtext("NAME") for d in datastores.findall("DATASTORE")] == ["demo-backups"]
    assert [i.text for i in images.iterfind("IMAGE/ID")] == [image_id]
    assert [d.name() for d in local_libvirt.listAllDomains() if d.name() == name] == [name]
    assert local_libvirt.lookupByName(name).UUIDString() == dom.UUIDString()

    dom.destroy()
    dom.undefine()  # the domain vanishes: the next start says so and serves on, creating nothing
    third = serve_in_netns(state_dir)
    try:
        wait_for_log(third, "its backups fail until the domain is back")
        [vms] = query(third, ("one.vmpool.info", [-2, -1, -1, -1]))
    finally:
        stop(third)
    assert [v.findtext("ID") for v in vms.findall("VM")] == ["0"]
    assert name not in [d.name() for d in local_libvirt.listAllDomains()]


def test_no_demo_switch_creates_nothing(state_dir: Path) -> None:
    daemon = serve_in_netns(state_dir, "--no-demo")
    try:
        [hosts] = query(daemon, ("one.hostpool.info", []))
    finally:
        log = stop(daemon)
    assert hosts.findall("HOST") == []
    assert "demo:" not in log
    assert not (state_dir / "demo").exists() and not (state_dir / "backups").exists()


def test_without_libvirt_one_error_names_what_is_missing_and_the_daemon_serves_on(state_dir: Path) -> None:
    daemon = serve_in_netns(state_dir, libvirt_socket=False)
    try:
        wait_for_log(daemon, "demo: not set up")
        [hosts] = query(daemon, ("one.hostpool.info", []))  # still serving
    finally:
        log = stop(daemon)
    [error] = [line for line in log.splitlines() if " ERROR " in line]
    assert "demo: not set up: the local libvirt (qemu:///system) does not answer" in error
    assert "--no-demo" in error and "DEMO=0" in error and "scripts/local-libvirt up" in error
    assert hosts.findall("HOST") == []  # nothing half made: the next start sets the demo up


@pytest.mark.parametrize("flags", [(), ("--demo",)])
def test_a_configuration_file_means_no_demo_unless_asked(state_dir: Path, flags: tuple[str, ...]) -> None:
    """Daemons started with a sched.conf (every other test's ``start_daemon``) get no demo by default."""
    if flags:
        daemon = _start_with_config(state_dir, flags)
        wait_for_log(daemon, "demo: ready")
    else:
        daemon = start_daemon(state_dir)
    try:
        hosts = query(daemon, ("one.hostpool.info", []))[0].findall("HOST")
    finally:
        log = stop(daemon)
    assert [h.findtext("NAME") for h in hosts] == (["localhost"] if flags else [])
    assert ("demo:" in log) is bool(flags)


def _start_with_config(state: Path, flags: tuple[str, ...]) -> Daemon:
    state.mkdir(parents=True)
    (state / "sched.conf").write_text('LISTEN = [ ADDRESS = "127.0.0.1", PORT = "0" ]\n')
    log_file = state / "daemon.log"
    with log_file.open("a") as log:
        process = subprocess.Popen([sys.executable, "-m", "scheduler", "serve", "--state-dir", str(state), *flags],
                                   stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO,
                                   env=dict(os.environ, PYTHONUNBUFFERED="1"))
    endpoint = _wait_for_listening(process, log_file, WAIT)
    env = dict(os.environ, VMSCHED_ENDPOINT=endpoint, VMSCHED_AUTH=str(state / "one_auth"), HOME=str(state))
    return Daemon(state, process, endpoint, state / "one_auth", env, log_file)
