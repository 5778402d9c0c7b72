"""up / down / status / purge of the real test environment, and its command line.

``up`` is idempotent: it installs what is missing, (re)starts only what is not running, keeps the ports
chosen the first time (``DIR/ports.json``), records every started process in ``DIR/env.json`` as soon as it
runs, and ends by checking ``ssh HOST virsh version`` on every host. ``down`` stops exactly the recorded
processes; ``purge`` also undefines the hosts' domains and removes DIR.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from urllib.parse import quote

from tests.realenv import ceph, hostns, model, procs, sshsetup, system
from tests.realenv.errors import EnvUnavailable, RealEnvError
from tests.realenv.model import BackupServerInfo, HostInfo, ProcRef, RealEnv
from tests.realenv.sshsetup import LOOPBACK, SshServer

log = logging.getLogger(__name__)

DEFAULT_DIR = Path("/tmp/vmsched-realenv")
DIR_ENV_VAR = "VMSCHED_REALENV_DIR"
DEFAULT_HOSTS = 2
BACKUP_NAME = "backup"
PORTS_FILE = "ports.json"
CEPH_DIR = "ceph"  # the single-node Ceph cluster (tests.realenv.ceph), started by the tests that need it


def default_dir() -> Path:
    return Path(os.environ.get(DIR_ENV_VAR) or DEFAULT_DIR)


def host_names(count: int) -> list[str]:
    return [f"host{i}" for i in range(1, count + 1)]


def libvirt_uri(port: int, wrapper: Path) -> str:
    return f"qemu+ssh://root@{LOOPBACK}:{port}/system?command={quote(str(wrapper), safe='/')}"


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _free_port(taken: set[int]) -> int:
    while True:
        with socket.socket() as s:
            s.bind((LOOPBACK, 0))
            port = s.getsockname()[1]
        if port not in taken:
            return port


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def choose_ports(directory: Path, names: list[str], running: frozenset[str] = frozenset()) -> dict[str, int]:
    """Ports recorded by an earlier ``up``, plus free loopback ports for names that have none yet.

    A recorded port is kept while its sshd (``running``) holds it or while it is free; one taken by some
    other process since is replaced.
    """
    path = directory / PORTS_FILE
    ports: dict[str, int] = json.loads(path.read_text()) if path.exists() else {}
    for name in names:
        if name in ports and name not in running and not _bindable(ports[name]):
            log.warning("%s: recorded port %d is taken by another process, choosing a new one", name, ports[name])
            del ports[name]
        if name not in ports:
            ports[name] = _free_port(set(ports.values()))
    path.write_text(json.dumps(ports, indent=2, sort_keys=True) + "\n")
    return {name: ports[name] for name in names}


def _servers(directory: Path, ports: dict[str, int]) -> list[SshServer]:
    def state(name: str) -> Path:
        return directory / ("hosts/" + name if name != BACKUP_NAME else BACKUP_NAME)

    return [SshServer(name, port, directory / "ssh" / f"{name}_host_ed25519", state(name) / "sshd.pid",
                      state(name) / "sshd.log") for name, port in ports.items()]


def _describe(directory: Path, servers: list[SshServer], previous: RealEnv | None) -> RealEnv:
    """The environment's description for these servers (hosts first, the backup server last), keeping the
    processes recorded earlier."""
    ssh = sshsetup.files(directory / "ssh")
    old_hosts = {h.name: h for h in previous.hosts} if previous else {}
    hosts = []
    for server in servers[:-1]:
        state = server.pidfile.parent
        old = old_hosts.get(server.name)
        hosts.append(HostInfo(
            name=server.name, address=LOOPBACK, ssh_port=server.port, user="root", key=ssh.client_key,
            libvirt_uri=libvirt_uri(server.port, ssh.wrapper), state_dir=state, log_dir=state / "log",
            mount_ns=old.mount_ns if old else "", procs=old.procs if old else ()))
    backup = servers[-1]
    return RealEnv(dir=directory, ssh=ssh, hosts=tuple(hosts), backup=BackupServerInfo(
        name=BACKUP_NAME, address=LOOPBACK, ssh_port=backup.port, user="root", key=ssh.client_key,
        data_dir=backup.pidfile.parent / "data", procs=previous.backup.procs if previous else ()))


def _with_proc(procs_: tuple[ProcRef, ...], ref: ProcRef) -> tuple[ProcRef, ...]:
    return tuple(p for p in procs_ if p.role != ref.role) + (ref,)


def _running(ref: ProcRef | None) -> bool:
    return ref is not None and procs.is_running(ref)


class _Recorder:
    """Holds the current description and writes env.json after every change, so ``down`` finds everything."""

    def __init__(self, env: RealEnv) -> None:
        self.env = env
        model.save(env)

    def host(self, host: HostInfo) -> HostInfo:
        self.env = self.env.with_host(host)
        model.save(self.env)
        return host

    def add(self, host: HostInfo, ref: ProcRef) -> HostInfo:
        return self.host(replace(host, procs=_with_proc(host.procs, ref)))


def _ensure_host(rec: _Recorder, host: HostInfo, server: SshServer) -> None:
    layout = hostns.HostLayout(host.state_dir)
    conf_changed = hostns.prepare_dirs(layout)
    holder = host.proc("holder")
    if holder is None or not procs.is_running(holder):
        hostns.stop_host(host)
        holder = hostns.start_holder(layout)
        host = rec.host(replace(host, mount_ns=procs.mount_ns_of(holder.pid), procs=(holder,)))
        log.info("%s: mount namespace %s (holder pid %d)", host.name, host.mount_ns, holder.pid)
    if not _running(host.proc("virtlogd")):
        host = rec.add(host, hostns.start_daemon(holder, "virtlogd", [
            "virtlogd", "-d", "--pid-file", str(layout.pidfile("virtlogd"))], layout.pidfile("virtlogd")))
    libvirtd = host.proc("libvirtd")
    if conf_changed and libvirtd is not None and procs.is_running(libvirtd):
        log.info("%s: qemu.conf changed, restarting libvirtd", host.name)
        procs.stop([libvirtd])
    if not _running(host.proc("libvirtd")):
        started = time.monotonic()
        hostns.copy_capabilities_in(layout)
        for ref in hostns.start_libvirtd(holder, layout):
            host = rec.add(host, ref)
        hostns.wait_libvirtd(holder)
        hostns.copy_capabilities_out(layout)
        log.info("%s: libvirtd ready in %.1f s", host.name, time.monotonic() - started)
    if not _running(host.proc("sshd")):
        host = rec.add(host, hostns.start_daemon(
            holder, "sshd", sshsetup.sshd_argv(rec.env.dir / "ssh", server), server.pidfile))


def _ensure_backup(rec: _Recorder, server: SshServer) -> None:
    backup = rec.env.backup
    backup.data_dir.mkdir(parents=True, exist_ok=True)
    sshd = next((p for p in backup.procs if p.role == "sshd"), None)
    if _running(sshd):
        return
    server.pidfile.unlink(missing_ok=True)
    procs.run(sshsetup.sshd_argv(rec.env.dir / "ssh", server))
    ref = procs.ref_from_pidfile("sshd", server.pidfile)
    rec.env = replace(rec.env, backup=replace(backup, procs=(ref,)))
    model.save(rec.env)


def verify(env: RealEnv) -> None:
    """Every host answers ``virsh version`` over ssh as itself; the backup server answers ssh."""
    def check_host(host: HostInfo) -> None:
        out = procs.run([str(env.ssh.wrapper), host.name, 'echo "$REALENV_HOST"; virsh -c qemu:///system version'],
                        timeout=60).stdout
        if out.splitlines()[0] != host.name or "libvirt" not in out:
            raise RealEnvError(f"{host.name}: unexpected answer over ssh: {out!r}")

    def check_backup() -> None:
        procs.run([str(env.ssh.wrapper), env.backup.name, "true"], timeout=60)

    with ThreadPoolExecutor(max_workers=len(env.hosts) + 1) as pool:
        futures = [pool.submit(check_host, h) for h in env.hosts] + [pool.submit(check_backup)]
        for future in futures:
            future.result()


def _sshd_running(env: RealEnv | None) -> frozenset[str]:
    if env is None:
        return frozenset()
    servers = [(h.name, h.procs) for h in env.hosts] + [(env.backup.name, env.backup.procs)]
    return frozenset(name for name, refs in servers for r in refs if r.role == "sshd" and procs.is_running(r))


def up(directory: Path | None = None, *, hosts: int | None = None) -> RealEnv:
    """Create or complete the environment in ``directory``; returns its description."""
    directory = (directory or default_dir()).absolute()
    system.check_can_create()
    with _locked(directory):
        installed = system.prepare_machine()
        if installed:
            log.info("installed %s", " ".join(installed))
        previous = model.load(directory)
        count = hosts or (len(previous.hosts) if previous else DEFAULT_HOSTS)
        if previous:
            for gone in previous.hosts[count:]:
                hostns.stop_host(gone)
        servers = _servers(directory, choose_ports(directory, [*host_names(count), BACKUP_NAME],
                                                   _sshd_running(previous)))
        sshsetup.ensure_files(directory / "ssh", servers)
        rec = _Recorder(_describe(directory, servers, previous))
        for host, server in zip(rec.env.hosts, servers, strict=False):
            _ensure_host(rec, host, server)
        _ensure_backup(rec, servers[-1])
        (directory / "env.sh").write_text(model.env_sh(rec.env))
        verify(rec.env)
        return rec.env


def _down(env: RealEnv) -> list[ProcRef]:
    stopped: list[ProcRef] = ceph.down(env.dir / CEPH_DIR)
    for host in env.hosts:
        stopped += hostns.stop_host(host)
    stopped += procs.stop(env.backup.procs)
    cleared = replace(env, hosts=tuple(replace(h, procs=()) for h in env.hosts),
                      backup=replace(env.backup, procs=()))
    model.save(cleared)
    return stopped


def down(directory: Path | None = None) -> list[ProcRef]:
    """Stop every process the environment started (after destroying the hosts' running domains)."""
    directory = (directory or default_dir()).absolute()
    if not (directory / model.ENV_FILE).exists():
        return []
    with _locked(directory):
        env = model.load(directory)
        return _down(env) if env is not None else []


def purge(directory: Path | None = None) -> None:
    """``down``, undefine every domain of every host (with snapshot and checkpoint metadata), remove DIR."""
    directory = (directory or default_dir()).absolute()
    if not directory.exists():
        return
    with _locked(directory):
        env = model.load(directory)
        if env is not None:
            for host in env.hosts:
                hostns.destroy_domains(host, undefine=True)
            _down(env)
        shutil.rmtree(directory)


def status_lines(env: RealEnv) -> tuple[list[str], bool]:
    """Human-readable state of every recorded process and host; the flag says whether all run."""
    lines, healthy = [], True
    for name, port, refs in [(h.name, h.ssh_port, h.procs) for h in env.hosts] + [
            (env.backup.name, env.backup.ssh_port, env.backup.procs)]:
        states = [f"{r.role}={r.pid}:{'up' if procs.is_running(r) else 'DOWN'}" for r in refs]
        healthy = healthy and bool(refs) and all(procs.is_running(r) for r in refs)
        lines.append(f"{name:8} port {port:5}  {' '.join(states) or 'not started'}")
    for host in env.hosts:
        if hostns.libvirtd_running(host):
            lines.append(f"{host.name:8} domains: {' '.join(hostns.domain_names(host)) or '-'}")
    cluster = ceph.load(env.dir / CEPH_DIR) if (env.dir / CEPH_DIR).exists() else None
    if cluster is not None:  # started by the tests that need it; not judged when it was never started
        states = [f"{r.role}={r.pid}:{'up' if procs.is_running(r) else 'DOWN'}" for r in cluster.procs]
        lines.append(f"{'ceph':8} port {cluster.mon_port:5}  {' '.join(states) or 'not started'}")
    return lines, healthy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.realenv", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["up", "down", "status", "purge"])
    parser.add_argument("--dir", type=Path, default=None, help=f"state directory (default ${DIR_ENV_VAR} "
                        f"or {DEFAULT_DIR})")
    parser.add_argument("--hosts", type=int, default=None, help=f"number of hypervisor hosts for up "
                        f"(default: as before, else {DEFAULT_HOSTS})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="realenv: %(message)s", stream=sys.stderr)
    directory = (args.dir or default_dir()).absolute()
    started = time.monotonic()
    try:
        if args.command == "up":
            env = up(directory, hosts=args.hosts)
            print(f"up in {time.monotonic() - started:.1f} s: {directory}/env.json, source {directory}/env.sh")
            for host in env.hosts:
                print(f"  {host.name}: ssh port {host.ssh_port}, {host.libvirt_uri}")
            print(f"  {env.backup.name}: ssh port {env.backup.ssh_port}, data {env.backup.data_dir}")
        elif args.command == "down":
            stopped = down(directory)
            print(f"down in {time.monotonic() - started:.1f} s: stopped {len(stopped)} processes")
        elif args.command == "purge":
            purge(directory)
            print(f"purged in {time.monotonic() - started:.1f} s: {directory}")
        else:
            recorded = model.load(directory)
            if recorded is None:
                print(f"no environment in {directory}")
                return 3
            lines, healthy = status_lines(recorded)
            print("\n".join(lines))
            return 0 if healthy else 1
    except EnvUnavailable as exc:
        print(f"realenv: cannot be created here: {exc}", file=sys.stderr)
        return 2
    except RealEnvError as exc:
        print(f"realenv: {args.command} failed: {exc}", file=sys.stderr)
        return 1
    return 0
