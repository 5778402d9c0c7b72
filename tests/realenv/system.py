"""Machine-wide prerequisites: Debian packages, the libvirt-qemu account, libvirt directories, qemu.conf.

Each step checks first and changes nothing when the machine is already right. Packages are Debian 12's;
``libvirt-daemon-system`` is deliberately absent (it pulls systemd, udev and ~200 packages).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tests.realenv.errors import EnvUnavailable
from tests.realenv.procs import run

PACKAGES = (
    "libvirt-daemon", "libvirt-daemon-driver-qemu", "libvirt-clients", "qemu-system-x86", "qemu-utils",
    "openssh-server", "openssh-client", "rsync", "restic",
)
TOOLS = ("unshare", "nsenter", "setsid", "sleep", "mount")

QEMU_CONF_HEADER = "# Written by tests/realenv"
QEMU_CONF = f"""\
{QEMU_CONF_HEADER}: QEMU runs as root without relabelling (images may sit in 0700 test
# directories), stays in the caller's cgroups and in its host's mount namespace (no private /dev).
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
"""
QEMU_CONF_PATH = Path("/etc/libvirt/qemu.conf")
FOREIGN_BACKUP_SUFFIX = ".pre-realenv"

# Mount points the hosts' private directories are bound over, in every host's namespace.
LIBVIRT_DIRS = {
    "run": Path("/run/libvirt"),
    "lib": Path("/var/lib/libvirt"),
    "cache": Path("/var/cache/libvirt"),
    "log": Path("/var/log/libvirt"),
    "etc": Path("/etc/libvirt"),
}
CAPABILITIES_CACHE = Path("/var/cache/libvirt/qemu")
APT_ENV = {"DEBIAN_FRONTEND": "noninteractive"}


def check_can_create() -> None:
    """Raise EnvUnavailable with the precise reason when this machine cannot host the environment."""
    if os.geteuid() != 0:
        raise EnvUnavailable(f"not root (euid {os.geteuid()}): libvirtd, sshd and mount namespaces need root")
    missing_tools = [t for t in TOOLS if shutil.which(t) is None]
    if missing_tools:
        raise EnvUnavailable(f"missing tools: {', '.join(missing_tools)}")
    if missing_packages() and shutil.which("apt-get") is None:
        raise EnvUnavailable(f"packages {', '.join(missing_packages())} are missing and there is no apt-get")


def missing_packages(packages: tuple[str, ...] = PACKAGES) -> list[str]:
    if shutil.which("dpkg-query") is None:
        return list(packages)
    done = run(["dpkg-query", "-W", "-f", "${Package} ${db:Status-Status}\n", *packages], check=False)
    installed = {line.split()[0] for line in done.stdout.splitlines() if line.endswith(" installed")}
    return [p for p in packages if p not in installed]


def install_packages(packages: tuple[str, ...] = PACKAGES) -> list[str]:
    """apt-get update + install only what is missing of ``packages``; returns what was installed."""
    missing = missing_packages(packages)
    if not missing:
        return []
    env = {**os.environ, **APT_ENV}
    lock = ["-o", "DPkg::Lock::Timeout=600"]
    run(["apt-get", *lock, "update"], env=env, timeout=600)
    run(["apt-get", "install", "-y", "--no-install-recommends", *lock, *missing], env=env, timeout=900)
    still = missing_packages(packages)
    if still:
        raise EnvUnavailable(f"apt-get did not install: {', '.join(still)}")
    return missing


def ensure_accounts() -> None:
    """The kvm and libvirt-qemu groups and the libvirt-qemu user libvirtd resolves before reading qemu.conf."""
    for group in ("kvm", "libvirt-qemu"):
        if run(["getent", "group", group], check=False).returncode != 0:
            run(["groupadd", "-r", group])
    if run(["getent", "passwd", "libvirt-qemu"], check=False).returncode != 0:
        run(["useradd", "-r", "-g", "libvirt-qemu", "-G", "kvm", "-d", "/var/lib/libvirt",
             "-s", "/usr/sbin/nologin", "libvirt-qemu"])


def ensure_dirs() -> None:
    for path in (*LIBVIRT_DIRS.values(), CAPABILITIES_CACHE, Path("/var/log/libvirt/qemu"),
                 Path("/var/lib/libvirt/qemu"), Path("/var/lib/libvirt/images")):
        path.mkdir(parents=True, exist_ok=True)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)


def ensure_qemu_conf(path: Path = QEMU_CONF_PATH) -> bool:
    """Write the recommended qemu.conf, keeping a foreign one as ``qemu.conf.pre-realenv``; True if changed."""
    if path.exists():
        current = path.read_text()
        if current == QEMU_CONF:
            return False
        backup = path.with_name(path.name + FOREIGN_BACKUP_SUFFIX)
        if not current.startswith(QEMU_CONF_HEADER) and not backup.exists():
            shutil.copy2(path, backup)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(QEMU_CONF)
    return True


def prepare_machine() -> list[str]:
    """All machine-wide steps; returns the packages installed (empty when none were missing)."""
    check_can_create()
    installed = install_packages()
    ensure_accounts()
    ensure_dirs()
    ensure_qemu_conf()
    return installed
