"""The typed description of a running real environment, as written to ``DIR/env.json``.

Everything here is plain data: which "hosts" exist, how to reach them over ssh and libvirt, where their
state lives and which processes the environment started (PID plus start time, so that a reused PID is
never mistaken for ours).
"""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tests.realenv.errors import RealEnvError

ENV_FILE = "env.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ProcRef:
    """A process the environment started: a role name, its PID and its start time (``/proc/PID/stat`` field 22)."""

    role: str
    pid: int
    starttime: int


@dataclass(frozen=True)
class SshFiles:
    """Client side of ssh: the wrapper (``ssh -F config``), its config, the strict known_hosts and the key."""

    wrapper: Path
    config: Path
    known_hosts: Path
    client_key: Path


@dataclass(frozen=True)
class HostInfo:
    """A hypervisor "host": its own libvirtd + virtlogd + sshd in a private mount namespace."""

    name: str
    address: str
    ssh_port: int
    user: str
    key: Path
    libvirt_uri: str
    state_dir: Path
    log_dir: Path
    mount_ns: str = ""
    procs: tuple[ProcRef, ...] = ()

    def proc(self, role: str) -> ProcRef | None:
        return next((p for p in self.procs if p.role == role), None)


@dataclass(frozen=True)
class BackupServerInfo:
    """The backup server: an sshd (no libvirt) whose ``data_dir`` receives uploads."""

    name: str
    address: str
    ssh_port: int
    user: str
    key: Path
    data_dir: Path
    procs: tuple[ProcRef, ...] = ()


@dataclass(frozen=True)
class RealEnv:
    """One instance of the environment, rooted at ``dir``."""

    dir: Path
    ssh: SshFiles
    hosts: tuple[HostInfo, ...]
    backup: BackupServerInfo

    def host(self, name: str) -> HostInfo:
        for host in self.hosts:
            if host.name == name:
                return host
        raise RealEnvError(f"no host {name!r} in {self.dir} (hosts: {', '.join(h.name for h in self.hosts)})")

    def ssh_argv(self, target: str, argv: list[str]) -> list[str]:
        """A local argv that runs ``argv`` on ``target`` (a host name or ``backup``), each word quoted once."""
        return [str(self.ssh.wrapper), target, "--", shlex.join(argv)]

    def all_procs(self) -> tuple[ProcRef, ...]:
        return tuple(p for h in self.hosts for p in h.procs) + self.backup.procs

    def with_host(self, host: HostInfo) -> RealEnv:
        return replace(self, hosts=tuple(host if h.name == host.name else h for h in self.hosts))


def _paths_to_str(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: _paths_to_str(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_paths_to_str(v) for v in value]
    return value


def to_json(env: RealEnv) -> str:
    data = {"version": FORMAT_VERSION, **_paths_to_str(asdict(env))}  # type: ignore[dict-item]
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def _procs(items: list[dict]) -> tuple[ProcRef, ...]:
    return tuple(ProcRef(**item) for item in items)


def _host(d: dict) -> HostInfo:
    return HostInfo(
        name=d["name"], address=d["address"], ssh_port=d["ssh_port"], user=d["user"], key=Path(d["key"]),
        libvirt_uri=d["libvirt_uri"], state_dir=Path(d["state_dir"]), log_dir=Path(d["log_dir"]),
        mount_ns=d["mount_ns"], procs=_procs(d["procs"]),
    )


def _backup(d: dict) -> BackupServerInfo:
    return BackupServerInfo(
        name=d["name"], address=d["address"], ssh_port=d["ssh_port"], user=d["user"], key=Path(d["key"]),
        data_dir=Path(d["data_dir"]), procs=_procs(d["procs"]),
    )


def from_json(text: str) -> RealEnv:
    data = json.loads(text)
    if data.get("version") != FORMAT_VERSION:
        raise RealEnvError(f"env.json format {data.get('version')!r} is not {FORMAT_VERSION}")
    ssh = data["ssh"]
    return RealEnv(
        dir=Path(data["dir"]),
        ssh=SshFiles(*(Path(ssh[k]) for k in ("wrapper", "config", "known_hosts", "client_key"))),
        hosts=tuple(_host(h) for h in data["hosts"]),
        backup=_backup(data["backup"]),
    )


def load(directory: Path) -> RealEnv | None:
    """The environment recorded in ``directory``, or None when there is none."""
    path = directory / ENV_FILE
    if not path.exists():
        return None
    return from_json(path.read_text())


def save(env: RealEnv) -> None:
    path = env.dir / ENV_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(to_json(env))
    tmp.replace(path)


def env_sh(env: RealEnv) -> str:
    """Shell exports describing ``env`` (``DIR/env.sh``)."""
    values = {
        "REALENV_DIR": str(env.dir),
        "REALENV_SSH": str(env.ssh.wrapper),
        "REALENV_SSH_CONFIG": str(env.ssh.config),
        "REALENV_SSH_KEY": str(env.ssh.client_key),
        "REALENV_SSH_KNOWN_HOSTS": str(env.ssh.known_hosts),
        "REALENV_HOSTS": " ".join(h.name for h in env.hosts),
        "REALENV_HOST_PORTS": " ".join(f"{h.name}={h.ssh_port}" for h in env.hosts),
        "REALENV_LIBVIRT_SSH_URIS": " ".join(h.libvirt_uri for h in env.hosts),
        "REALENV_BACKUP_HOST": env.backup.name,
        "REALENV_BACKUP_PORT": str(env.backup.ssh_port),
        "REALENV_BACKUP_DIR": str(env.backup.data_dir),
    }
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in values.items())
