"""SSH files of an environment: keys, one sshd config per server, a strict known_hosts, the client config.

The renderers are pure; ``ensure_*`` write files only when their content changes. Layout under DIR/ssh:
``client_ed25519`` (+ ``.pub``), ``authorized_keys``, ``<server>_host_ed25519``, ``sshd_<server>.conf``,
``known_hosts``, ``ssh_config`` and ``ssh`` (the wrapper: ``exec ssh -F ssh_config "$@"``).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from tests.realenv.model import SshFiles
from tests.realenv.procs import run

LOOPBACK = "127.0.0.1"
CLIENT_KEY = "client_ed25519"


@dataclass(frozen=True)
class SshServer:
    """One sshd to configure: its name (also its ssh_config alias), port, host key and files."""

    name: str
    port: int
    host_key: Path
    pidfile: Path
    logfile: Path


def files(ssh_dir: Path) -> SshFiles:
    return SshFiles(wrapper=ssh_dir / "ssh", config=ssh_dir / "ssh_config",
                    known_hosts=ssh_dir / "known_hosts", client_key=ssh_dir / CLIENT_KEY)


def sshd_config(server: SshServer, authorized_keys: Path) -> str:
    """``SHLVL=1``: bash then counts itself as a nested shell and skips ~/.bashrc, which Debian's bash
    otherwise reads for every command sshd runs (on a developer machine it may cost 0.1-0.3 s each)."""
    return f"""\
Port {server.port}
ListenAddress {LOOPBACK}
HostKey {server.host_key}
PidFile {server.pidfile}
AuthorizedKeysFile {authorized_keys}
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
Subsystem sftp internal-sftp
MaxStartups 100:30:200
MaxSessions 64
UseDNS no
SetEnv REALENV_HOST={server.name} SHLVL=1
"""


def known_hosts_line(port: int, public_key: str) -> str:
    key_type, key_data = public_key.split()[:2]
    return f"[{LOOPBACK}]:{port} {key_type} {key_data}\n"


def ssh_config(servers: list[SshServer], ssh: SshFiles) -> str:
    blocks = [f"Host {s.name}\n  HostName {LOOPBACK}\n  Port {s.port}\n" for s in servers]
    blocks.append(f"""\
Host *
  User root
  IdentityFile {ssh.client_key}
  IdentitiesOnly yes
  UserKnownHostsFile {ssh.known_hosts}
  GlobalKnownHostsFile /dev/null
  StrictHostKeyChecking yes
  UpdateHostKeys no
  CheckHostIP no
  BatchMode yes
  ConnectTimeout 10
  KexAlgorithms curve25519-sha256
  LogLevel ERROR
""")
    return "\n".join(blocks)


def wrapper_script(config: Path) -> str:
    return f'#!/bin/sh\nexec ssh -F {shlex.quote(str(config))} "$@"\n'


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    path.chmod(mode)


def ensure_key(path: Path, comment: str) -> str:
    """An ed25519 key pair at ``path`` (generated once); returns the public key line."""
    if not path.exists():
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])
    path.chmod(0o600)
    return path.with_name(path.name + ".pub").read_text().strip()


def ensure_files(ssh_dir: Path, servers: list[SshServer]) -> SshFiles:
    """Keys, authorized_keys, per-server sshd configs, known_hosts, ssh_config and the wrapper."""
    ssh_dir.mkdir(parents=True, exist_ok=True)
    ssh = files(ssh_dir)
    client_pub = ensure_key(ssh.client_key, "vmsched-realenv-client")
    authorized_keys = ssh_dir / "authorized_keys"
    _write(authorized_keys, client_pub + "\n")
    known = []
    for server in servers:
        known.append(known_hosts_line(server.port, ensure_key(server.host_key, f"vmsched-realenv-{server.name}")))
        _write(sshd_config_path(ssh_dir, server.name), sshd_config(server, authorized_keys))
    _write(ssh.known_hosts, "".join(known))
    _write(ssh.config, ssh_config(servers, ssh))
    _write(ssh.wrapper, wrapper_script(ssh.config), 0o755)
    return ssh


def sshd_config_path(ssh_dir: Path, name: str) -> Path:
    return ssh_dir / f"sshd_{name}.conf"


def sshd_argv(ssh_dir: Path, server: SshServer) -> list[str]:
    return ["/usr/sbin/sshd", "-f", str(sshd_config_path(ssh_dir, server.name)), "-E", str(server.logfile)]
