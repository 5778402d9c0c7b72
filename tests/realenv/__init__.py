"""The real test environment: libvirtd + QEMU "hosts" behind sshd, and a backup server, on loopback.

Command line: ``python -m tests.realenv up|down|status|purge [--dir DIR]``.
Pytest fixtures: ``tests.realenv.plugin``. Tiny QEMU domains: ``tests.realenv.domains``.
"""

from tests.realenv.errors import EnvUnavailable, RealEnvError
from tests.realenv.model import BackupServerInfo, HostInfo, ProcRef, RealEnv, SshFiles

__all__ = ["BackupServerInfo", "EnvUnavailable", "HostInfo", "ProcRef", "RealEnv", "RealEnvError", "SshFiles"]
