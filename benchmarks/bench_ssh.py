"""The SSH command layer: throughput over one pooled connection, and a cold start on 20 hosts.

Run: .venv/bin/python -m benchmarks.bench_ssh [--commands N] [--in-flight N] [--hosts N] [--json]

The "hosts" are extra plain sshd instances on loopback started here (own host keys, the realenv client
key in authorized_keys) and stopped by PID at the end. Their sessions get ``HOME`` set to an empty
directory, so the login shell reads no rc file and the figures measure ssh, not a dotfile. For
comparison, the same commands also run on realenv's host1 (whose root login shell reads this machine's
~/.bashrc), and through one OpenSSH client process per command (a sample, extrapolated and labelled so).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from drivers import hostkeys
from drivers.ssh import SshPool, SshSettings, SshTarget
from tests.realenv import realenv as realenv_cli
from tests.realenv.model import RealEnv

COMMAND = ".venv/bin/python -m benchmarks.bench_ssh"
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class BenchHosts:
    ports: list[int]
    known_hosts: Path
    client_key: Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def sshd_config(port: int, host_key: Path, authorized_keys: Path, home: Path) -> str:
    return (f"Port {port}\nListenAddress {LOOPBACK}\nHostKey {host_key}\nPidFile none\n"
            f"AuthorizedKeysFile {authorized_keys}\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nMaxStartups 100:30:200\n"
            f"MaxSessions 64\nUseDNS no\nSetEnv HOME={home}\n")


def wait_listening(port: int, process: subprocess.Popen[bytes], within: float = 10) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"sshd on port {port} exited with {process.returncode}")
        try:
            socket.create_connection((LOOPBACK, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.01)
    raise RuntimeError(f"sshd on port {port} not listening after {within} s")


@contextmanager
def extra_sshds(env: RealEnv, count: int, workdir: Path) -> Iterator[BenchHosts]:
    """``count`` sshd instances on free loopback ports; their keys recorded in a fresh known_hosts."""
    home = workdir / "home"
    home.mkdir()
    authorized = workdir / "authorized_keys"
    authorized.write_text(Path(f"{env.ssh.client_key}.pub").read_text())
    known_hosts = workdir / "known_hosts"
    processes: list[subprocess.Popen[bytes]] = []
    ports: list[int] = []
    try:
        for index in range(count):
            key = workdir / f"host{index}_ed25519"
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
            port = free_port()
            conf = workdir / f"sshd{index}.conf"
            conf.write_text(sshd_config(port, key, authorized, home))
            processes.append(subprocess.Popen(
                ["/usr/sbin/sshd", "-D", "-f", str(conf), "-E", str(workdir / f"sshd{index}.log")]))
            pub_type, pub_data = Path(f"{key}.pub").read_text().split()[:2]
            with known_hosts.open("a") as out:
                out.write(f"{hostkeys.host_pattern(LOOPBACK, port)} {pub_type} {pub_data}\n")
            ports.append(port)
        for port, process in zip(ports, processes, strict=True):
            wait_listening(port, process)
        yield BenchHosts(ports, known_hosts, env.ssh.client_key)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=10)


def pool_for(known_hosts: Path, key: Path, max_sessions: int) -> SshPool:
    return SshPool(SshSettings(known_hosts=known_hosts, key=key, max_sessions=max_sessions))


async def pooled_commands(pool: SshPool, target: SshTarget, count: int, in_flight: int) -> dict:
    await pool.run(target, ["true"], timeout=30)  # connect first: this measures commands, not the handshake
    slots = asyncio.Semaphore(in_flight)

    async def one() -> None:
        async with slots:
            await pool.run(target, ["true"], timeout=60)

    started = time.monotonic()
    await asyncio.gather(*(one() for _ in range(count)))
    seconds = time.monotonic() - started
    return {"commands": count, "in_flight": in_flight, "seconds": round(seconds, 3),
            "commands_per_s": round(count / seconds, 1)}


def openssh_argv(known_hosts: Path, key: Path, port: int) -> list[str]:
    return ["ssh", "-F", "/dev/null", "-i", str(key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", f"UserKnownHostsFile={known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=yes", "-p", str(port), f"root@{LOOPBACK}", "true"]


async def openssh_commands(argvs: list[list[str]], in_flight: int) -> float:
    slots = asyncio.Semaphore(in_flight)

    async def one(argv: list[str]) -> None:
        async with slots:
            process = await asyncio.create_subprocess_exec(*argv, stdin=subprocess.DEVNULL)
            if await process.wait() != 0:
                raise RuntimeError(f"{argv} exited with {process.returncode}")

    started = time.monotonic()
    await asyncio.gather(*(one(argv) for argv in argvs))
    return time.monotonic() - started


async def cold_start(hosts: BenchHosts) -> dict:
    pool = pool_for(hosts.known_hosts, hosts.client_key, 10)
    started = time.monotonic()
    try:
        await asyncio.gather(*(pool.run(SshTarget(LOOPBACK, port), ["true"], timeout=60) for port in hosts.ports))
        pooled = time.monotonic() - started
    finally:
        await pool.close()
    argvs = [openssh_argv(hosts.known_hosts, hosts.client_key, port) for port in hosts.ports]
    openssh = await openssh_commands(argvs, len(argvs))
    return {"hosts": len(hosts.ports), "pool_seconds": round(pooled, 3), "openssh_seconds": round(openssh, 3)}


async def measure(env: RealEnv, hosts: BenchHosts, count: int, in_flight: int, sample: int) -> dict:
    target = SshTarget(LOOPBACK, hosts.ports[0])
    figures: dict = {}
    for label, max_sessions in (("pool", in_flight + 1), ("pool_default_max_sessions", 10)):
        pool = pool_for(hosts.known_hosts, hosts.client_key, max_sessions)
        try:
            figures[label] = {**await pooled_commands(pool, target, count, in_flight), "max_sessions": max_sessions}
        finally:
            await pool.close()
    argv = openssh_argv(hosts.known_hosts, hosts.client_key, hosts.ports[0])
    seconds = await openssh_commands([argv] * sample, in_flight)
    figures["openssh_per_command"] = {
        "commands": sample, "in_flight": in_flight, "seconds": round(seconds, 3),
        "commands_per_s": round(sample / seconds, 1),
        f"extrapolated_seconds_for_{count}": round(seconds * count / sample, 1),
    }
    host1 = env.host("host1")
    pool = pool_for(env.ssh.known_hosts, env.ssh.client_key, in_flight + 1)
    try:
        figures["pool_on_realenv_host1"] = await pooled_commands(
            pool, SshTarget(host1.address, host1.ssh_port, host1.user), sample, in_flight)
    finally:
        await pool.close()
    figures["cold_start"] = await cold_start(hosts)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", type=int, default=1000)
    parser.add_argument("--in-flight", type=int, default=50)
    parser.add_argument("--sample", type=int, default=100, help="commands through the OpenSSH client and on host1")
    parser.add_argument("--hosts", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    env = realenv_cli.up()
    with tempfile.TemporaryDirectory(prefix="vmsched-bench-ssh-") as workdir, \
            extra_sshds(env, args.hosts, Path(workdir)) as hosts:
        figures = asyncio.run(measure(env, hosts, args.commands, args.in_flight, args.sample))
    figures["command"] = COMMAND
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    report(figures, args.commands)


def report(f: dict, count: int) -> None:
    pool, default, openssh, host1, cold = (f["pool"], f["pool_default_max_sessions"], f["openssh_per_command"],
                                           f["pool_on_realenv_host1"], f["cold_start"])
    print(f"{pool['commands']} x `true`, {pool['in_flight']} in flight, one pooled connection "
          f"(max_sessions {pool['max_sessions']}): {pool['seconds']} s, {pool['commands_per_s']} commands/s")
    print(f"  same with the default max_sessions 10 (9 commands at once): {default['seconds']} s, "
          f"{default['commands_per_s']} commands/s")
    print(f"OpenSSH client per command, {openssh['commands']} commands, {openssh['in_flight']} in flight: "
          f"{openssh['seconds']} s, {openssh['commands_per_s']} commands/s; "
          f"EXTRAPOLATED to {count}: {openssh[f'extrapolated_seconds_for_{count}']} s")
    print(f"pool on realenv host1 (login shell reads root's ~/.bashrc), {host1['commands']} commands: "
          f"{host1['seconds']} s, {host1['commands_per_s']} commands/s")
    print(f"cold start, one command on each of {cold['hosts']} hosts in parallel: pool {cold['pool_seconds']} s, "
          f"OpenSSH clients {cold['openssh_seconds']} s")
    print(f"reproduce: {f['command']}")


if __name__ == "__main__":
    main()
