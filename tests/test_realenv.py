"""The real test environment itself: its pure pieces (always) and the running hosts (marked realenv)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

from tests.realenv import ceph as ceph_env
from tests.realenv import domains, hostns, model, procs, sshsetup
from tests.realenv import realenv as renv
from tests.realenv.domains import Hypervisor, TinyDomain
from tests.realenv.errors import EnvUnavailable
from tests.realenv.model import BackupServerInfo, HostInfo, ProcRef, RealEnv, SshFiles
from tests.realenv.plugin import REQUIRE_ENV_VAR

# ---------------------------------------------------------------------------------------------- pure pieces


@pytest.mark.parametrize("cdrom", [None, Path("/d/cd.iso")])
def test_domain_xml_is_a_tiny_tcg_domain(cdrom: Path | None) -> None:
    xml = domains.domain_xml("a<b", Path("/d/x.qcow2"), Path("/d/y.raw"), cdrom)
    root = ElementTree.fromstring(xml)
    assert root.get("type") == "qemu"
    assert root.findtext("name") == "a<b"
    assert (root.findtext("memory"), root.find("memory").get("unit")) == ("64", "MiB")
    disks = {d.find("target").get("dev"): (d.get("device"), d.find("driver").get("type"),
                                           d.find("source").get("file")) for d in root.iterfind("devices/disk")}
    expected = {"vda": ("disk", "qcow2", "/d/x.qcow2"), "vdb": ("disk", "raw", "/d/y.raw")}
    if cdrom:
        expected["hdc"] = ("cdrom", "raw", str(cdrom))
    assert disks == expected
    assert domains.disk_sources(xml) == {dev: Path(file) for dev, (_, _, file) in expected.items()}
    assert root.find("devices/channel/target").get("name") == "org.qemu.guest_agent.0"
    assert root.find("devices/graphics") is None


@pytest.mark.parametrize(("disk", "device"), [("vda", "virtio-disk0"), ("vdb", "virtio-disk1")])
def test_hmp_qemu_io_targets_the_virtio_backend(disk: str, device: str) -> None:
    assert domains.hmp_qemu_io(disk, "write -P 0x5a 8M 2M") == (
        f'qemu-io -d /machine/peripheral/{device}/virtio-backend "write -P 0x5a 8M 2M"')


def test_ssh_files_are_strict(tmp_path: Path) -> None:
    ssh = sshsetup.files(tmp_path)
    servers = [sshsetup.SshServer("host1", 2201, tmp_path / "k", tmp_path / "p", tmp_path / "l")]
    config = sshsetup.ssh_config(servers, ssh)
    for line in ("Host host1", "Port 2201", "StrictHostKeyChecking yes", f"UserKnownHostsFile {ssh.known_hosts}",
                 "GlobalKnownHostsFile /dev/null", "BatchMode yes", f"IdentityFile {ssh.client_key}"):
        assert line in config
    assert sshsetup.known_hosts_line(2201, "ssh-ed25519 AAAAkey comment") == "[127.0.0.1]:2201 ssh-ed25519 AAAAkey\n"
    sshd = sshsetup.sshd_config(servers[0], tmp_path / "authorized_keys")
    assert "PasswordAuthentication no" in sshd and "ListenAddress 127.0.0.1" in sshd
    assert "SetEnv REALENV_HOST=host1" in sshd


def test_process_identity_includes_start_time() -> None:
    me = procs.ref_of("me", os.getpid())
    assert procs.is_running(me)
    assert not procs.is_running(ProcRef("me", me.pid, me.starttime + 1))  # a reused PID is not ours
    assert procs.stat_fields(2**22 + 1) is None


def test_stop_ends_a_process_and_reports_it() -> None:
    child = subprocess.Popen(["sleep", "60"])
    ref = procs.ref_of("sleep", child.pid)
    assert procs.stop([ref], timeout=5) == [ref]
    assert not procs.is_running(ref)  # a zombie counts as gone
    child.wait()
    assert procs.stop([ref]) == []


def test_env_json_round_trip(tmp_path: Path) -> None:
    ssh = SshFiles(tmp_path / "w", tmp_path / "c", tmp_path / "k", tmp_path / "key")
    host = HostInfo("host1", "127.0.0.1", 2201, "root", ssh.client_key, "qemu+ssh://x", tmp_path / "h",
                    tmp_path / "h/log", "mnt:[1]", (ProcRef("libvirtd", 10, 20),))
    env = RealEnv(tmp_path, ssh, (host,), BackupServerInfo("backup", "127.0.0.1", 2202, "root", ssh.client_key,
                                                           tmp_path / "data", (ProcRef("sshd", 11, 21),)))
    model.save(env)
    assert model.load(tmp_path) == env
    assert env.ssh_argv("host1", ["virsh", "list", "a b"]) == [str(ssh.wrapper), "host1", "--", "virsh list 'a b'"]


def test_ports_are_chosen_once_and_reused(tmp_path: Path) -> None:
    first = renv.choose_ports(tmp_path, ["host1", "backup"])
    assert len(set(first.values())) == 2
    grown = renv.choose_ports(tmp_path, ["host1", "backup", "host2"])
    assert {k: grown[k] for k in first} == first
    assert grown["host2"] not in first.values()
    assert renv.choose_ports(tmp_path, ["host1", "backup"]) == first
    with socket.socket() as squatter:  # another process took host1's port while our sshd was down
        squatter.bind(("127.0.0.1", first["host1"]))
        squatter.listen()
        assert renv.choose_ports(tmp_path, ["host1"], frozenset({"host1"})) == {"host1": first["host1"]}
        moved = renv.choose_ports(tmp_path, ["host1", "backup"])
    assert moved["backup"] == first["backup"] and moved["host1"] != first["host1"]


def test_not_root_is_reported_as_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(EnvUnavailable, match="not root"):
        renv.up(Path("/nonexistent/realenv"))


def test_fixture_skips_loudly_when_the_env_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text("import os\nos.geteuid = lambda: 1000\n")
    (tmp_path / "test_uses_env.py").write_text(
        "def test_a(realenv):\n    raise AssertionError('ran')\n\ndef test_b(tiny_domain):\n    raise AssertionError\n")
    def session(require: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), REQUIRE_ENV_VAR: require}
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "tests.realenv.plugin", "-p", "no:cacheprovider", "-rs",
             str(tmp_path)], capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)

    done = session("0")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "REAL TEST ENVIRONMENT UNAVAILABLE" in done.stdout
    assert done.stdout.count("REAL TEST ENVIRONMENT UNAVAILABLE") == 2  # one banner, printed once
    assert "2 skipped" in done.stdout and "not root (euid 1000)" in done.stdout
    required = session("1")  # as CI runs them: the real tests must run, so they fail
    assert required.returncode == 1, required.stdout + required.stderr
    assert "2 errors" in required.stdout and "VMSCHED_REQUIRE_REALENV=1: the real tests must run" in required.stdout


# ---------------------------------------------------------------------------------------------- real hosts


def _ssh(env: RealEnv, target: str, argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(env.ssh_argv(target, argv), capture_output=True, text=True, timeout=60, **kw)


@pytest.mark.realenv
def test_up_again_is_idempotent(realenv: RealEnv) -> None:
    again = renv.up(realenv.dir)
    assert [(h.name, h.ssh_port, h.procs) for h in again.hosts] == [
        (h.name, h.ssh_port, h.procs) for h in realenv.hosts]
    assert again.backup.procs == realenv.backup.procs
    assert all(procs.is_running(p) for p in again.all_procs())
    assert model.load(realenv.dir) == again


@pytest.mark.realenv
def test_each_host_sees_only_its_own_domains(realenv: RealEnv, tiny_domain, hypervisors) -> None:
    dom: TinyDomain = tiny_domain("host1", start=False)
    assert dom.name in hypervisors("host1").names()
    assert dom.name not in hypervisors("host2").names()
    over_ssh = {h.name: _ssh(realenv, h.name, ["virsh", "-q", "list", "--all", "--name"]).stdout.split()
                for h in realenv.hosts}
    assert dom.name in over_ssh["host1"] and dom.name not in over_ssh["host2"]


@pytest.mark.realenv
def test_ssh_checks_host_keys(realenv: RealEnv, tmp_path: Path) -> None:
    for target in [h.name for h in realenv.hosts] + [realenv.backup.name]:
        assert _ssh(realenv, target, ["printenv", "REALENV_HOST"]).stdout.strip() == target
    other = sshsetup.ensure_key(tmp_path / "impostor", "impostor")
    bad = tmp_path / "known_hosts"
    bad.write_text(sshsetup.known_hosts_line(realenv.host("host1").ssh_port, other))
    refused = subprocess.run([str(realenv.ssh.wrapper), "-o", f"UserKnownHostsFile={bad}", "host1", "true"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 255
    assert "Host key verification failed" in refused.stderr


@pytest.mark.realenv
def test_disk_only_snapshot_and_active_blockcommit(realenv: RealEnv, tiny_domain, hypervisors,
                                                   tmp_path: Path) -> None:
    host, hv = realenv.host("host2"), hypervisors("host2")
    dom: TinyDomain = tiny_domain("host2")
    assert hv.state(dom) == "running"
    overlays = {disk: tmp_path / f"{disk}.s1.qcow2" for disk in ("vda", "vdb")}
    _virsh(host, ["snapshot-create-as", dom.name, "--name", "s1", "--disk-only", "--atomic", "--no-metadata",
                  *[a for d, p in overlays.items() for a in ("--diskspec", f"{d},file={p}")]])
    assert {d: hv.disk_sources(dom)[d] for d in overlays} == overlays
    for disk in overlays:
        _virsh(host, ["blockcommit", dom.name, disk, "--active", "--pivot"])
    assert {d: hv.disk_sources(dom)[d] for d in overlays} == {"vda": dom.vda, "vdb": dom.vdb}
    assert hv.state(dom) == "running"


def _virsh(host: HostInfo, args: list[str]) -> str:
    done = subprocess.run(domains.virsh_argv(host, args), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.realenv
@pytest.mark.parametrize(("disk", "fmt"), [("vda", "qcow2"), ("vdb", "raw")])
def test_qemu_io_write_changes_the_guest_disk(tiny_domain, hypervisors, tmp_path: Path, disk: str,
                                              fmt: str) -> None:
    hv: Hypervisor = hypervisors("host1")
    dom: TinyDomain = tiny_domain("host1")
    image = getattr(dom, disk)
    blank = tmp_path / f"blank.{fmt}"
    size = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(image)], capture_output=True,
                          text=True, check=True).stdout
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(blank), str(_virtual_size(size))], check=True)

    def compare() -> subprocess.CompletedProcess[str]:
        return subprocess.run(["qemu-img", "compare", "-U", str(image), str(blank)], capture_output=True, text=True)

    assert compare().returncode == 0
    hv.write_pattern(dom, disk, pattern=0x5A, offset="8M", length="2M")
    changed = compare()
    assert changed.returncode == 1
    assert "offset 8388608" in changed.stdout
    with open(image, "rb") as f:  # for the raw disk, the bytes themselves
        if fmt == "raw":
            f.seek(8 << 20)
            assert f.read(2 << 20) == b"\x5a" * (2 << 20)


def _virtual_size(info_json: str) -> int:
    return int(json.loads(info_json)["virtual-size"])


@pytest.mark.realenv
def test_rsync_from_a_host_to_the_backup_server(realenv: RealEnv, tmp_path: Path) -> None:
    source = tmp_path / "disk.img"
    source.write_bytes(os.urandom(256 << 10))
    dest = realenv.backup.data_dir / f"rsync-test-{os.getpid()}"
    argv = ["rsync", "-aS", "-e", str(realenv.ssh.wrapper), str(source), f"{realenv.backup.name}:{dest}/"]
    try:
        done = _ssh(realenv, "host1", argv)  # runs on host1: data goes host -> backup server directly
        assert done.returncode == 0, done.stderr
        assert (dest / "disk.img").read_bytes() == source.read_bytes()
    finally:
        subprocess.run(["rm", "-rf", "--", str(dest)], check=True)


@pytest.mark.realenv
def test_down_stops_every_process_it_started(realenv: RealEnv, tmp_path: Path) -> None:
    directory = tmp_path / "second"
    try:
        second = renv.up(directory, hosts=1)
        assert {second.host("host1").ssh_port, second.backup.ssh_port}.isdisjoint(
            {h.ssh_port for h in realenv.hosts} | {realenv.backup.ssh_port})
        hv = Hypervisor(second.host("host1"))
        try:
            dom = hv.define(tmp_path / "domains", start=True)
            assert dom.name not in {n for h in realenv.hosts for n in hostns.domain_names(h)}
        finally:
            hv.close()
        cluster = ceph_env.up(directory / renv.CEPH_DIR)  # its Ceph cluster goes down with it
        started = (*second.all_procs(), *cluster.procs)
        assert all(procs.is_running(p) for p in started)
        qemu_pid = int((second.host("host1").state_dir / "run" / "qemu" / f"{dom.name}.pid").read_text())
        qemu = procs.ref_of("qemu", qemu_pid)
        assert qemu.pid in {r.pid for r in procs.pids_in_mount_ns(second.host("host1").mount_ns)}
        stopped = renv.down(directory)
        assert set(started) <= set(stopped)
        assert not [p for p in (*started, qemu) if procs.is_running(p)]
        assert procs.pids_in_mount_ns(second.host("host1").mount_ns) == []
        assert all(procs.is_running(p) for p in realenv.all_procs())  # the session's instance is untouched
    finally:
        renv.purge(directory)
    assert not directory.exists()

