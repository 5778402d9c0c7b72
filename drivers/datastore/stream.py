"""One file of a backup datastore read as a stream of bytes (downloads, restores through the scheduler).

The :class:`drivers.commands.Runner` contract returns a command's whole output at once, which does not suit
a disk of many gigabytes; here the reading command is a child process whose stdout is relayed chunk by
chunk. Where it runs follows the datastore:

* ``fs``: on this machine;
* ``rsync``: on the backup server, through OpenSSH with vmsched's own known_hosts (strict host key
  checking, never the user's) and key, the same trust the pooled asyncssh connections use;
* ``restic``: ``restic dump`` on the SFTP server the same way, its password written to its stdin.

The command is ``sh -c 'stat ... && exec cat ...'``: the first line of its output is the file's size (for
Content-Length), the rest the file itself, read from the one file that was measured. The script is a
constant; the path reaches it as a positional parameter.

A disk at a later increment of a chain is no file on the datastore: :func:`open_disk_at` merges its links
on the server (``qemu-img convert`` of the chain, as KEEP_LAST does) into one self-contained qcow2 that never
has a name there (written through an open descriptor of a file unlinked at once, so a killed download
leaves nothing behind), then streams it the same way; restic's links are dumped beside the repository
first, into a private directory removed when the command ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shlex
import signal
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from drivers.commands import HostUnreachable, stderr_tail
from drivers.datastore import layout, open_datastore, server_of
from drivers.datastore.base import TreeDatastore
from drivers.datastore.layout import Chain
from drivers.datastore.merge import chain_spec
from drivers.datastore.restic import ResticDatastore
from drivers.datastore.rsync import RunnerFactory
from drivers.ssh import SshSettings
from scheduler.errors import ActionError, DriverError, NotFound
from scheduler.model.objects.datastore import Datastore

CHUNK = 1 << 20
IDLE_TIMEOUT = 120.0  # seconds without a byte from the reader before the stream is given up
SSH_FAILED = 255
CIPHERS = "aes128-gcm@openssh.com,chacha20-poly1305@openssh.com"
_SIZE_THEN_DATA = 'stat -L -c %s -- "$1" && exec cat -- "$1"'
_SIZE_LINE_THEN = 'echo "$1" && shift && exec "$@"'
# $1 a fresh path beside the VM's directory, $2 the chain's json: spec, $3 "<sha256>  <link>" lines, then the
# command (if any) that puts the links in the directory $1 (created private for it, removed after). Every
# link must have its recorded sha256 before anything is merged.
_MERGED_THEN_DATA = """\
t=$1; spec=$2; sums=$3; shift 3
if [ "$#" -gt 0 ]; then
  mkdir -m 700 -- "$t" || exit
  trap 'rm -rf -- "$t"' EXIT; trap 'exit 129' HUP; trap 'exit 130' INT; trap 'exit 143' TERM
  "$@" || exit
fi
printf '%s\\n' "$sums" | sha256sum --check --quiet --strict >&2 || {
  echo "a link of the chain differs from the sha256 recorded at backup time: nothing merged" >&2; exit 1; }
exec 3<>"$t.qcow2" && rm -f -- "$t.qcow2" || exit
qemu-img convert -q -O qcow2 "$spec" /dev/fd/3 || exit
rm -rf -- "$t"
stat -L -c %s /dev/fd/3 && exec cat <&3
"""
MERGE_TIMEOUT = 6 * 3600.0  # seconds for the merge of a chain before the first byte of a download


def reader_argv(datastore: Datastore, ssh: SshSettings, path: str, script: Sequence[str] | None = None) -> list[str]:
    """The command that prints ``path``'s size on a line, then its bytes; run on the datastore's server.
    ``script``: another command printing the same (a restic dump: :func:`size_then`)."""
    script = list(script or ["sh", "-c", _SIZE_THEN_DATA, "sh", layout.check_path(path, "backup file path")])
    if datastore.ds_mad == "fs":
        return script
    target = server_of(datastore)
    if target is None:
        raise ActionError(f"datastore {datastore.id}: reading backup files of DS_MAD {datastore.ds_mad!r} "
                          "is not supported (fs, rsync and restic are)")
    argv = ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={ssh.known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", f"ConnectTimeout={max(1, int(ssh.connect_timeout))}", "-o", "ServerAliveInterval=30",
            "-c", CIPHERS, "-p", str(target.port), "-l", target.user]  # fmt: skip
    if ssh.key is not None:
        argv += ["-o", "IdentitiesOnly=yes", "-i", str(ssh.key)]
    return [*argv, "--", target.host, shlex.join(script)]


def size_then(size: int, argv: Sequence[str]) -> list[str]:
    """``argv`` (which prints a file of ``size`` bytes) preceded by the size line :func:`open_stream` reads."""
    return ["sh", "-c", _SIZE_LINE_THEN, "sh", str(int(size)), *argv]


@dataclass
class FileStream:
    """An open file: its size, then its bytes through :meth:`chunks` (once)."""

    size: int
    path: str
    process: asyncio.subprocess.Process
    idle_timeout: float = IDLE_TIMEOUT

    async def chunks(self, chunk: int = CHUNK) -> AsyncIterator[bytes]:
        """The file's bytes; a DriverError when the reader stops short or fails."""
        assert self.process.stdout is not None
        sent = 0
        while True:
            try:
                data = await asyncio.wait_for(self.process.stdout.read(chunk), self.idle_timeout)
            except TimeoutError:
                raise DriverError(f"{self.path}: no data for {self.idle_timeout:g} s; stream given up",
                                  retryable=True) from None
            if not data:
                break
            sent += len(data)
            yield data
        stderr = await _stderr(self.process)  # to its end: wait() returns once every pipe is closed
        status = await asyncio.wait_for(self.process.wait(), self.idle_timeout)
        if status != 0 or sent != self.size:
            raise DriverError(f"{self.path}: reading stopped after {sent} of {self.size} bytes "
                              f"(status {status}): {stderr}", retryable=True)


@contextlib.asynccontextmanager
async def open_stream(datastore: Datastore, ssh: SshSettings, path: str, *, script: Sequence[str] | None = None,
                      input: bytes | None = None, idle_timeout: float = IDLE_TIMEOUT,
                      open_timeout: float | None = None) -> AsyncIterator[FileStream]:
    """``path`` on the datastore's server, opened for reading; the reader is killed on leaving. ``script``
    and ``input``: another reader (:func:`reader_argv`) and what goes to its stdin; ``open_timeout``: how long
    it may take to print the size (default: the idle timeout plus the ssh connect timeout)."""
    argv = reader_argv(datastore, ssh, path, script)
    process = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL if input is None else asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True)
    try:
        assert process.stdout is not None
        if input is not None:
            assert process.stdin is not None
            process.stdin.write(input)
            await process.stdin.drain()
            process.stdin.close()
        opening = idle_timeout + ssh.connect_timeout if open_timeout is None else open_timeout
        try:
            line = await asyncio.wait_for(process.stdout.readline(), opening)
        except TimeoutError:
            raise HostUnreachable(f"datastore {datastore.id}: no answer reading {path} within {opening:g} s",
                                  retryable=True) from None
        if not line.strip().isdigit():
            stderr = await _stderr(process)
            status = await asyncio.wait_for(process.wait(), idle_timeout)
            raise _open_error(datastore, path, status, stderr)
        yield FileStream(int(line), path, process, idle_timeout)
    finally:
        await _stop(process)


def _open_error(datastore: Datastore, path: str, status: int, stderr: str) -> Exception:
    where = f"datastore {datastore.id}"
    if datastore.ds_mad != "fs" and status == SSH_FAILED:
        return HostUnreachable(f"{where}: cannot reach the backup server {server_of(datastore)}: {stderr}",
                               retryable=True)
    if "No such file" in stderr:
        return NotFound(f"{where}: {path} does not exist")
    return DriverError(f"{where}: cannot read {path} (status {status}): {stderr}")


async def _stderr(process: asyncio.subprocess.Process) -> str:
    if process.stderr is None:
        return ""
    try:
        return stderr_tail(await asyncio.wait_for(process.stderr.read(), 5))
    except TimeoutError:
        return ""


async def _stop(process: asyncio.subprocess.Process) -> None:
    """Kill the reader and reap it. Its pipes are drained to their end first: asyncio finishes ``wait()`` only
    once every pipe is closed, and a pipe whose reading was paused (a consumer that stopped early) never is."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    await asyncio.shield(_reap(process))


async def _reap(process: asyncio.subprocess.Process) -> None:
    for pipe in (process.stdout, process.stderr):
        while pipe is not None and await pipe.read(CHUNK):
            pass
    await process.wait()


@contextlib.asynccontextmanager
async def open_backup_file(datastore: Datastore, ssh: SshSettings, pool: RunnerFactory, vm_id: int, source: str,
                           name: str, path: str) -> AsyncIterator[FileStream]:
    """File ``name`` of backup ``source`` of VM ``vm_id`` (at ``path`` on a directory datastore), opened for
    reading where it is stored."""
    script: list[str] | None = None
    stdin: bytes | None = None
    if datastore.ds_mad == "restic":
        store = open_datastore(datastore, pool)
        assert isinstance(store, ResticDatastore)
        snapshot_id, in_snapshot, size = await store.snapshot_file(vm_id, source, name)
        dump, stdin = store.dump_command(vm_id, snapshot_id, in_snapshot)
        script = size_then(size, dump)
    async with open_stream(datastore, ssh, path, script=script, input=stdin) as stream:
        yield stream


@contextlib.asynccontextmanager
async def open_disk_at(datastore: Datastore, ssh: SshSettings, pool: RunnerFactory, vm_id: int, chain: Chain,
                       disk_id: int, path: str, digests: Sequence[str] = ()) -> AsyncIterator[FileStream]:
    """Disk ``disk_id`` of VM ``vm_id`` as it was at the last link of ``chain`` (base first), opened for
    reading: the stored file itself for a one-link chain, else the links, each checked against its recorded
    sha256 in ``digests`` (one per link), merged on the server into one self-contained qcow2. ``path``: what
    the URL names (messages; the file itself for a one-link chain)."""
    names = [layout.disk_file_name(disk_id, n) for n, _ in chain]
    if len(chain) == 1:
        async with open_backup_file(datastore, ssh, pool, vm_id, chain[0][1], names[0], path) as stream:
            yield stream
        return
    store = open_datastore(datastore, pool)
    if not isinstance(store, ResticDatastore | TreeDatastore):
        raise ActionError(f"datastore {datastore.id}: chains of DS_MAD {datastore.ds_mad!r} cannot be downloaded")
    temp = f"{store.layout.vm_dir(vm_id)}.vmsched-download-{secrets.token_hex(8)}"  # beside the VM's directory
    put_links: list[str] = []
    stdin: bytes | None = None
    sources = [source for _, source in chain]
    if isinstance(store, ResticDatastore):
        files = [(await store.snapshot_file(vm_id, source, name))[:2] for source, name in zip(sources, names, strict=True)]
        put_links, stdin = store.dump_files_command(vm_id, files, temp)
        links = [f"{temp}/{n}" for n in range(len(chain))]
    else:
        links = [store.layout.file_path(vm_id, source, name) for source, name in zip(sources, names, strict=True)]
    if len(digests) != len(links):
        raise ActionError(f"{path}: {len(links)} links to merge, {len(digests)} recorded sha256 to check them by")
    sums = "\n".join(f"{digest}  {link}" for digest, link in zip(digests, links, strict=True))
    script = ["sh", "-c", _MERGED_THEN_DATA, "sh", temp, chain_spec(links), sums, *put_links]
    async with open_stream(datastore, ssh, path, script=script, input=stdin, open_timeout=MERGE_TIMEOUT) as stream:
        yield stream
