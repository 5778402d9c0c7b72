"""One hypervisor "host": a private mount namespace holding its own virtlogd, libvirtd and sshd.

A holder process (``unshare --mount --propagation private`` + bind mounts, then ``sleep infinity``) keeps
the namespace alive; every daemon is started into it with ``nsenter --mount``, so each can be restarted
alone and ``ssh HOST virsh ...`` reaches only that host's libvirtd. The host's directories live under
``DIR/hosts/NAME/{run,lib,cache,log,etc}`` and are bound over the system's libvirt directories.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.realenv import procs
from tests.realenv.errors import RealEnvError
from tests.realenv.model import HostInfo, ProcRef
from tests.realenv.system import CAPABILITIES_CACHE, LIBVIRT_DIRS, QEMU_CONF

log = logging.getLogger(__name__)

LOCAL_URI = "qemu:///system"
DAEMON_ROLES = ("sshd", "libvirtd", "virtlogd")  # stopped together, before the reaper
# libvirtd runs under this subreaper. QEMU daemonises, so without it every QEMU is re-parented to PID 1,
# which here reaps zombies only about once a second, and each ``virsh destroy`` waits that long.
REAPER = """\
# vmsched realenv: subreaper of libvirtd and the QEMU processes it starts
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
with open(sys.argv[1], "w") as f:
    f.write(f"{os.getpid()}\\n")
if os.fork() == 0:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
    os.execvp(sys.argv[2], sys.argv[2:])
while True:
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        break  # no descendant left: libvirtd and every QEMU it started are gone
    signal.sigwaitinfo({signal.SIGCHLD})
"""
HOLDER_SCRIPT = """\
set -e
while [ $# -gt 1 ]; do mount --bind "$1" "$2"; shift 2; done
echo $$
exec sleep infinity </dev/null >/dev/null 2>&1
"""


@dataclass(frozen=True)
class HostLayout:
    """Where a host keeps its state: ``root/{run,lib,cache,log,etc}`` plus pid files and logs."""

    root: Path

    def sub(self, key: str) -> Path:
        return self.root / key

    def pidfile(self, role: str) -> Path:
        return self.root / f"{role}.pid"

    @property
    def capabilities(self) -> Path:
        return self.sub("cache") / "qemu"


def prepare_dirs(layout: HostLayout) -> bool:
    """Create the host's directories (etc seeded from /etc/libvirt); True when its qemu.conf changed."""
    for key in LIBVIRT_DIRS:
        layout.sub(key).mkdir(parents=True, exist_ok=True)
    for sub in ("lib/qemu", "lib/images", "cache/qemu", "log/qemu"):
        (layout.root / sub).mkdir(parents=True, exist_ok=True)
    etc = layout.sub("etc")
    if not any(etc.iterdir()) and LIBVIRT_DIRS["etc"].is_dir():
        # the machine's own domain definitions (e.g. the `make run` demo) stay out of the hosts
        shutil.copytree(LIBVIRT_DIRS["etc"], etc, dirs_exist_ok=True, symlinks=True,
                        ignore=lambda directory, names: [n for n in names if Path(directory).name in ("qemu", "lxc")
                                                         and n.endswith(".xml")])
    conf = etc / "qemu.conf"
    if conf.exists() and conf.read_text() == QEMU_CONF:
        return False
    conf.write_text(QEMU_CONF)
    return True


def start_holder(layout: HostLayout) -> ProcRef:
    """Create the namespace with the bind mounts; returns the holder process that keeps it."""
    pairs = [str(p) for key, target in LIBVIRT_DIRS.items() for p in (layout.sub(key), target)]
    argv = ["setsid", "-f", "unshare", "--mount", "--propagation", "private",
            "sh", "-c", HOLDER_SCRIPT, "realenv-holder", *pairs]
    with open(layout.root / "holder.log", "w") as err:
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, text=True)
        assert child.stdout is not None
        line = child.stdout.readline().strip()
        child.stdout.close()
        child.wait(timeout=10)
    if not line.isdigit():
        raise RealEnvError(f"mount namespace for {layout.root.name} failed: "
                           f"{(layout.root / 'holder.log').read_text().strip()}")
    return procs.ref_of("holder", int(line))


def nsenter(holder: ProcRef, argv: list[str]) -> list[str]:
    return ["nsenter", f"--target={holder.pid}", "--mount", "--", *argv]


def start_daemon(holder: ProcRef, role: str, argv: list[str], pidfile: Path, timeout: float = 120) -> ProcRef:
    """Start a self-daemonising ``argv`` inside the namespace and return it, found by its pid file."""
    pidfile.unlink(missing_ok=True)
    procs.run(nsenter(holder, argv), timeout=timeout)
    return procs.ref_from_pidfile(role, pidfile, timeout=timeout)


def start_libvirtd(holder: ProcRef, layout: HostLayout, timeout: float = 120) -> tuple[ProcRef, ProcRef]:
    """Start the reaper and libvirtd under it inside the namespace; returns (reaper, libvirtd)."""
    for role in ("reaper", "libvirtd"):
        layout.pidfile(role).unlink(missing_ok=True)
    argv = ["setsid", "-f", sys.executable, "-c", REAPER, str(layout.pidfile("reaper")),
            "libvirtd", "-d", "--pid-file", str(layout.pidfile("libvirtd"))]
    with open(layout.root / "reaper.log", "a") as out:
        subprocess.run(nsenter(holder, argv), stdin=subprocess.DEVNULL, stdout=out, stderr=out, check=True,
                       timeout=timeout)
    return (procs.ref_from_pidfile("reaper", layout.pidfile("reaper"), timeout=timeout),
            procs.ref_from_pidfile("libvirtd", layout.pidfile("libvirtd"), timeout=timeout))


def virsh(anchor: ProcRef, args: list[str], *, check: bool = True, timeout: float = 60) -> str:
    """Run virsh against the host's own libvirtd from inside its namespace."""
    return procs.run(nsenter(anchor, ["virsh", "-q", "-c", LOCAL_URI, *args]), check=check, timeout=timeout).stdout


def wait_libvirtd(anchor: ProcRef, timeout: float = 90) -> None:
    def answers() -> bool:
        return procs.run(nsenter(anchor, ["virsh", "-c", LOCAL_URI, "version"]), check=False,
                         timeout=timeout).returncode == 0

    procs.wait_until(answers, timeout, "libvirtd to answer", interval=0.1)


def _has_capabilities(cache: Path) -> bool:
    return any((cache / "capabilities").glob("*.xml"))


def copy_capabilities_in(layout: HostLayout) -> None:
    """Seed the host's QEMU capabilities cache from the machine's, so libvirtd skips its 8 s probe."""
    if not _has_capabilities(layout.capabilities) and _has_capabilities(CAPABILITIES_CACHE):
        shutil.copytree(CAPABILITIES_CACHE, layout.capabilities, dirs_exist_ok=True)


def copy_capabilities_out(layout: HostLayout) -> None:
    """After a first probe, keep its result as the machine's cache for the next hosts."""
    if _has_capabilities(layout.capabilities) and not _has_capabilities(CAPABILITIES_CACHE):
        shutil.copytree(layout.capabilities, CAPABILITIES_CACHE, dirs_exist_ok=True)


def anchor_of(host: HostInfo) -> ProcRef | None:
    """A running process inside the host's namespace to nsenter through (holder first)."""
    for role in ("holder", "libvirtd", "virtlogd", "sshd", "reaper"):
        ref = host.proc(role)
        if ref is not None and procs.is_running(ref):
            return ref
    return None


def libvirtd_running(host: HostInfo) -> bool:
    ref = host.proc("libvirtd")
    return ref is not None and procs.is_running(ref)


def domain_names(host: HostInfo, *, running_only: bool = False) -> list[str]:
    anchor = anchor_of(host)
    if anchor is None or not libvirtd_running(host):
        return []
    out = virsh(anchor, ["list", "--name", "--state-running" if running_only else "--all"])
    return [line.strip() for line in out.splitlines() if line.strip()]


def destroy_domains(host: HostInfo, *, undefine: bool = False) -> list[str]:
    """Destroy the host's running domains (and undefine all of them with their metadata if asked)."""
    anchor = anchor_of(host)
    if anchor is None or not libvirtd_running(host):
        return []
    names = domain_names(host, running_only=True)
    for name in names:
        virsh(anchor, ["destroy", name], check=False)
    if undefine:
        for name in domain_names(host):
            virsh(anchor, ["undefine", name, "--snapshots-metadata", "--checkpoints-metadata"], check=False)
    return names


def stop_host(host: HostInfo) -> list[ProcRef]:
    """Stop everything of ``host``: its domains, its daemons, any process left in its namespace, the holder."""
    destroy_domains(host)
    stopped = procs.stop([r for role in DAEMON_ROLES if (r := host.proc(role)) is not None])
    stopped += procs.stop([r for r in [host.proc("reaper")] if r is not None], timeout=2)  # ends by itself
    if host.mount_ns and host.mount_ns != procs.mount_ns_of(os.getpid()):
        holder = host.proc("holder")
        leftovers = [r for r in procs.pids_in_mount_ns(host.mount_ns) if holder is None or r.pid != holder.pid]
        if leftovers:
            log.warning("%s: stopping %d leftover processes in its namespace: %s", host.name, len(leftovers),
                        [r.pid for r in leftovers])
        stopped += procs.stop(leftovers)
    holder = host.proc("holder")
    if holder is not None:
        stopped += procs.stop([holder])
    return stopped
