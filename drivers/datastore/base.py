"""The backup datastore contract, and what every directory-tree datastore (``rsync``, ``fs``) shares.

A backup datastore keeps ``<BASE_PATH>/<vm_id>/<backup_id>/`` trees on a "server": the backup server over
SSH (``rsync``) or the scheduler's own machine (``fs``). Everything but the upload itself is the same
handful of commands run there through a :class:`Runner`; :class:`TreeDatastore` holds them, and the
drivers only add the data path.

Scripts given to ``sh -c`` here are constants; paths reach them as positional parameters, never pasted in.
"""

from __future__ import annotations

import asyncio
import logging
import math
import shlex
from collections.abc import Awaitable, Callable, Collection, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from drivers.commands import CommandFailed, Runner, shielded
from drivers.datastore import layout, merge
from drivers.datastore.check import ImageCheck, qemu_img_check
from drivers.datastore.layout import Layout
from drivers.sink import NO_SINK, DriverSink
from scheduler.errors import DriverError, NotFound, ValidationError
from scheduler.model.objects.datastore import Datastore

log = logging.getLogger(__name__)

COMMAND_TIMEOUT = 60.0  # seconds, for every metadata command (mkdir, df, cat, rm, mv)
PROGRESS_INTERVAL = 2.0  # seconds between two progress probes of a running upload
MAX_SMALL_FILE = 16 * 1024 * 1024  # read_file refuses more than this (vm.xml and friends are kilobytes)
MIB = 1024 * 1024
NEW_ID_ATTEMPTS = 10
DISCARD_ATTEMPTS = 5  # rm -rf of a partial upload, repeated while a dying receiver still creates files

# (bytes done per file name, bytes in total per file name); file names as given to upload
Progress = Callable[[Mapping[str, int], Mapping[str, int]], None]
# Told each heavy command's process group as it starts: (which side runs it: "source" or "server", the pgid)
ProcessStarted = Callable[[str, int], Awaitable[None]]

_MONITOR = 'mkdir -p -- "$1" && df -PB1M -- "$1"'
_RM = 'n=0; for d; do if [ -d "$d" ]; then rm -rf -- "$d" || exit 1; n=$((n + 1)); fi; done; [ "$n" -gt 0 ] || exit 3'
_CLEANUP = '[ -d "$1" ] || exit 0; find "$1" -mindepth 1 -maxdepth 1 -type d -name ".tmp-*" -print -exec rm -rf -- {} +'
# $1 VM dir, $2 final dir, $3 temporary dir: exit 3 when the backup exists; otherwise the partial uploads an
# earlier attempt could not remove (one backup of a VM runs at a time) go first, printed.
_NEW_DIR = ('[ -e "$2" ] && exit 3; mkdir -p -- "$1" && '
            'find "$1" -mindepth 1 -maxdepth 1 -type d -name ".tmp-*" -print -exec rm -rf -- {} + && mkdir -- "$3"')
_ANY_EXISTS = 'for p; do [ -e "$p" ] && exit 0; done; exit 1'
_TREE_SIZES = r"""find "$1" -type f -printf '%s %f\n' 2>/dev/null"""  # bytes and name of every file
# openssl is OpenSSL-speed; python3's hashlib too (OpenSSL inside). Never coreutils sha256sum (4x slower).
_HASH_PY = (
    "import hashlib,sys\n"
    "for p in sys.argv[1:]:\n"
    " h=hashlib.sha256()\n"
    " with open(p,'rb') as f:\n"
    "  while b:=f.read(1<<20): h.update(b)\n"
    " print(h.hexdigest(),'*'+p)\n"
)
NOT_FOUND_STATUS = 127
# bash -c: $1 the file written, "$@" after it the command printing the data. The bytes go to the file, then the
# file as written is read back (from the page cache) for its sha256 on stdout ("<hex> *stdin"). Measured on a
# 2-core host for 1 GiB over ssh: cat > file 1.4 s, then openssl 0.8 s = 2.2 s, where one pass through
# ``tee | openssl`` took 2.9-3.3 s (an extra pipe copy, and the hash fighting ssh for the CPU), rsync 2.5-3.0 s.
STREAM_TO_FILE = 'f=$1; shift; "$@" > "$f" && openssl dgst -sha256 -r < "$f"'


def run_label(staging_dir: str, vm_id: int) -> str:
    """What names the files a backup's datastore commands leave on the hypervisor if they are killed (restic's
    password files): the VM and the run (the staging directory's name), e.g. ``vm7-run42``."""
    return f"vm{vm_id}-run{staging_dir.rstrip('/').rsplit('/', 1)[-1]}"


def streamed_to(destination: str, argv: Sequence[str]) -> list[str]:
    """The argv writing ``argv``'s output to ``destination`` and printing its sha256 (:func:`streamed_digest`)."""
    return ["bash", "-c", STREAM_TO_FILE, "bash", destination, *argv]


def streamed_digest(output: bytes) -> str:
    return parse_digests(output, ["stdin"])["stdin"]


@dataclass(frozen=True)
class Capacity:
    """Datastore space in MB (plain numbers, unlike OpenNebula's ``2983M``)."""

    total_mb: int
    free_mb: int
    used_mb: int


@dataclass(frozen=True)
class UploadRequest:
    """One upload: ``files`` of ``staging_dir`` on the hypervisor ``source`` runs on, as backup ``backup_id``."""

    source: Runner
    staging_dir: str
    files: Sequence[str]
    vm_id: int
    backup_id: str
    timeout: float  # seconds for the whole transfer
    ssh_command: Sequence[str] | None = None  # how the hypervisor reaches the backup server (verified keys)
    progress: bool = False  # report the bytes sent per file to the sink (a probe every progress_interval)


@dataclass(frozen=True)
class FetchRequest:
    """One backup file brought back to a hypervisor: file ``name`` of backup ``backup_id`` of VM ``vm_id``,
    written at ``destination`` on the machine ``target`` runs commands on."""

    target: Runner  # the hypervisor's runner (a local one when the hypervisor is this machine)
    vm_id: int
    backup_id: str
    name: str
    destination: str
    timeout: float  # seconds for the whole copy
    # rsync, restic: the hypervisor's ssh to the backup server; fs: this machine's ssh to the hypervisor
    ssh_command: Sequence[str] | None = None
    label: str = ""  # names what the copy leaves on the hypervisor if it is killed (see remove_leftovers)


@dataclass(frozen=True)
class FlattenRequest:
    """Merge the chain ``links`` (``(increment id, backup id)``, base first) of VM ``vm_id`` into the new backup
    ``backup_id``: one self-contained ``disk.<id>.<n>`` per disk (``n`` the last link's increment) and that
    link's ``vm.xml`` and ``domain.xml``. The links themselves are left as they are."""

    vm_id: int
    links: Sequence[tuple[int, str]]
    disk_ids: Sequence[int]
    backup_id: str
    timeout: float  # seconds for the whole merge


@dataclass(frozen=True)
class UploadResult:
    """One uploaded backup: its allocated size on the hypervisor (like ``du -sm``) and each file's sha256."""

    size_mb: int
    sha256: dict[str, str] = field(default_factory=dict)


class BackupDatastore(Protocol):
    """What the backup action and the image operations call; one object per datastore."""

    datastore: Datastore
    server: Runner  # the machine holding the backups: the backup server over SSH, or this one

    async def monitor(self) -> Capacity: ...

    async def new_backup_id(self, vm_id: int) -> str: ...

    async def upload(self, request: UploadRequest, sink: DriverSink = NO_SINK) -> UploadResult:
        """The sink is told the process groups started ("source" or "server" side) and, when the request
        asks, the bytes sent per file."""

    async def fetch(self, request: FetchRequest, sink: DriverSink = NO_SINK) -> str | None:
        """Copy the file; the sha256 of the bytes written when the copy computed it on the way, else None.
        The sink is told each process group started ("host" or "local" side)."""

    async def fetch_all(self, requests: Sequence[FetchRequest], sink: DriverSink = NO_SINK) -> list[str | None]:
        """Copy several files to one host (a chain's links): what :meth:`fetch` returns, per request, in
        order; all of them copied or an error."""

    async def flatten(self, request: FlattenRequest, sink: DriverSink = NO_SINK) -> UploadResult:
        """Write the merged backup where the datastore keeps its backups, all of it or nothing; the sink is
        told each process group started ("server" side)."""

    async def rm(self, vm_id: int, sources: Sequence[str]) -> None: ...

    async def stat(self, vm_id: int, source: str, disk_id: int) -> int: ...

    async def read_file(self, vm_id: int, source: str, name: str) -> bytes: ...

    async def list_backup(self, vm_id: int, source: str) -> list[str]: ...

    async def exists(self, vm_id: int, source: str) -> bool: ...

    async def cleanup_partial(self, vm_id: int) -> list[str]: ...

    async def verify_files(self, vm_id: int, source: str, names: Sequence[str], disks: Collection[str],
                           timeout: float) -> tuple[dict[str, str], dict[str, ImageCheck]]: ...  # noqa: ASYNC109


# --- template attributes --------------------------------------------------------------------------------------

def int_attribute(datastore: Datastore, name: str, low: int, high: int | None = None) -> int | None:
    """An optional integer attribute of the datastore's TEMPLATE, range-checked."""
    raw = (datastore.template.get(name) or "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValidationError(f"datastore {datastore.id}: {name} must be an integer, got {raw!r}") from None
    if value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ValidationError(f"datastore {datastore.id}: {name} must be {bounds}, got {value}")
    return value


def parse_df(output: bytes) -> tuple[int, int, int]:
    """(total, used, available) from the last line of ``df -P``."""
    lines = output.decode("utf-8", "replace").strip().splitlines()
    fields = lines[-1].split() if lines else []
    try:
        return int(fields[1]), int(fields[2]), int(fields[3])
    except (IndexError, ValueError):
        raise DriverError(f"cannot read df output: {output[-200:]!r}") from None


def apply_limit(total: int, used: int, free: int, limit_mb: int | None) -> Capacity:
    """LIMIT_MB caps the datastore: free = min(df free, LIMIT_MB - used), total = min(df total, LIMIT_MB)."""
    if limit_mb is None:
        return Capacity(total, free, used)
    return Capacity(min(total, limit_mb), max(0, min(free, limit_mb - used)), used)


# --- hypervisor side: sizes and checksums of the staged files ---------------------------------------------------

def parse_stat_files(output: bytes, paths: Sequence[str]) -> list[tuple[int, int]]:
    """(apparent bytes, allocated bytes) of each path, from ``stat -c '%s %b %B'`` lines, one per path."""
    words = output.decode().split()
    if len(words) != 3 * len(paths):
        raise DriverError(f"unexpected stat output for {len(paths)} files: {output[-200:]!r}")
    numbers = [int(word) for word in words]
    return [(numbers[i], numbers[i + 1] * numbers[i + 2]) for i in range(0, len(numbers), 3)]


def parse_stat(output: bytes, paths: Sequence[str]) -> tuple[int, int]:
    """(apparent bytes, allocated bytes) summed over the paths."""
    sizes = parse_stat_files(output, paths)
    return sum(a for a, _ in sizes), sum(b for _, b in sizes)


async def staged_sizes(source: Runner, paths: Sequence[str], timeout: float) -> list[tuple[int, int]]:  # noqa: ASYNC109
    """(apparent, allocated) bytes of each staged file."""
    result = await source.run(["stat", "-L", "-c", "%s %b %B", "--", *paths], timeout=timeout)
    return parse_stat_files(result.stdout, paths)


def file_progress(listing: bytes, totals: Mapping[str, int]) -> dict[str, int]:
    """Bytes arrived per expected file name, from ``<size> <name>`` lines of the temporary directory. A
    file rsync is still receiving is named ``.<name>.<random>``; it counts for ``<name>``."""
    done = dict.fromkeys(totals, 0)
    for line in listing.decode("utf-8", "replace").splitlines():
        size, _, name = line.partition(" ")
        if not size.isdigit():
            continue
        if name not in done and name.startswith("."):
            name = name[1:].rsplit(".", 1)[0]
        if name in done:
            done[name] = min(totals[name], max(done[name], int(size)))
    return done


def parse_digests(output: bytes, paths: Sequence[str]) -> dict[str, str]:
    """``{path: hex}`` from ``<hex> *<path>`` lines (``openssl dgst -r`` and the Python fallback print that)."""
    digests = {}
    for line in output.decode().splitlines():
        digest, _, name = line.partition(" *")
        digests[name] = digest.strip().lower()
    missing = [path for path in paths if len(digests.get(path, "")) != 64]
    if missing:
        raise DriverError(f"no sha256 for {', '.join(missing)} in the hasher's output")
    return {path: digests[path] for path in paths}


async def hash_files(source: Runner, paths: Sequence[str], timeout: float,  # noqa: ASYNC109
                     nice: int | None = None, ionice: int | None = None,
                     started: Callable[[int], Awaitable[None]] | None = None) -> dict[str, str]:
    """sha256 of each path on ``source`` with ``openssl dgst``, or a ``python3`` one-liner without openssl."""
    argv = ["openssl", "dgst", "-sha256", "-r", "--", *paths]
    result = await source.run(argv, timeout=timeout, nice=nice, ionice=ionice, check=False, started=started)
    if result.exit_status == NOT_FOUND_STATUS:
        argv = ["python3", "-c", _HASH_PY, *paths]
        result = await source.run(argv, timeout=timeout, nice=nice, ionice=ionice, check=False, started=started)
    if result.exit_status != 0:
        raise CommandFailed(argv, result.exit_status, result.stderr, host=getattr(source, "host", None))
    return parse_digests(result.stdout, paths)


FETCH_PARALLEL = 3  # files of one fetch_all copied at the same time, where each takes its own command


async def fetch_each(fetch: Callable[[FetchRequest, DriverSink], Awaitable[str | None]],
                     requests: Sequence[FetchRequest], sink: DriverSink) -> list[str | None]:
    """``fetch`` of each request, :data:`FETCH_PARALLEL` at a time; the first failure cancels the rest."""
    bound = asyncio.Semaphore(FETCH_PARALLEL)
    digests: list[str | None] = [None] * len(requests)

    async def one(n: int, request: FetchRequest) -> None:
        async with bound:
            digests[n] = await fetch(request, sink)

    try:
        async with asyncio.TaskGroup() as group:
            for n, request in enumerate(requests):
                group.create_task(one(n, request))
    except BaseExceptionGroup as failed:
        raise first_error(failed) from None
    return digests


def first_error(error: BaseException) -> BaseException:
    """The first leaf of a (nested) exception group, so callers see the DriverError, not the group."""
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


# --- the shared tree operations ---------------------------------------------------------------------------------

class TreeDatastore:
    """A ``<BASE_PATH>/<vm_id>/<backup_id>/`` tree on the machine ``server`` runs commands on."""

    # what a backup into the datastore runs on the hypervisor (a host's monitoring says which it has)
    HYPERVISOR_TOOLS: ClassVar[tuple[str, ...]] = ("qemu-img",)
    REQUIRED_ATTRIBUTES: ClassVar[tuple[str, ...]] = ()  # a new datastore is refused without them
    PORT_ATTRIBUTES: ClassVar[tuple[str, ...]] = ()
    SERVER_ATTRIBUTES: ClassVar[tuple[str, ...]] = ()  # where the backup server is (none: this machine)
    # uploads from one hypervisor to the server may share one ssh connection (scheduler/backup/transport.py)
    SHARED_UPLOAD_CONNECTION: ClassVar[bool] = False

    @staticmethod
    def url_path(datastore: Datastore, vm_id: int, backup_id: str, name: str) -> str:
        """The path a backup URL names for file ``name`` of a backup."""
        return Layout(datastore.base_path).file_path(vm_id, backup_id, name)

    @staticmethod
    async def remove_leftovers(runner: Runner, label: str, timeout: float) -> None:  # noqa: ASYNC109
        """What killed commands of the run ``label`` left on the hypervisor ``runner`` reaches: nothing here."""
        return None

    def __init__(self, datastore: Datastore, server: Runner, *, command_timeout: float = COMMAND_TIMEOUT,
                 progress_interval: float = PROGRESS_INTERVAL) -> None:
        self.datastore = datastore
        self.server = server
        self.layout = Layout(datastore.base_path)
        self.command_timeout = command_timeout
        self.progress_interval = progress_interval
        self.limit_mb = int_attribute(datastore, "LIMIT_MB", 0)

    async def _run(self, argv: Sequence[str], *, check: bool = True, input: bytes | None = None) -> bytes:
        result = await self.server.run(argv, timeout=self.command_timeout, check=check, input=input)
        return result.stdout

    async def _status(self, argv: Sequence[str]) -> int:
        result = await self.server.run(argv, timeout=self.command_timeout, check=False)
        if result.exit_status not in (0, 1):
            raise CommandFailed(argv, result.exit_status, result.stderr, host=getattr(self.server, "host", None))
        return result.exit_status

    async def monitor(self) -> Capacity:
        """Space where BASE_PATH lives (created when missing), LIMIT_MB applied."""
        total, used, free = parse_df(await self._run(["sh", "-c", _MONITOR, "sh", self.layout.base_path]))
        return apply_limit(total, used, free, self.limit_mb)

    async def new_backup_id(self, vm_id: int) -> str:
        """A random 6-hex-char id whose directory (final or temporary) does not exist yet."""
        for _ in range(NEW_ID_ATTEMPTS):
            backup_id = layout.random_backup_id()
            paths = [self.layout.backup_dir(vm_id, backup_id), self.layout.tmp_dir(vm_id, backup_id)]
            if await self._status(["sh", "-c", _ANY_EXISTS, "sh", *paths]) == 1:
                return backup_id
        raise DriverError(f"datastore {self.datastore.id}: no free backup id after {NEW_ID_ATTEMPTS} attempts")

    async def exists(self, vm_id: int, source: str) -> bool:
        return await self._status(["test", "-d", self.layout.backup_dir(vm_id, source)]) == 0

    async def read_file(self, vm_id: int, source: str, name: str) -> bytes:
        path = self.layout.file_path(vm_id, source, name)
        result = await self.server.run(["head", "-c", str(MAX_SMALL_FILE + 1), "--", path],
                                       timeout=self.command_timeout, check=False)
        if result.exit_status != 0:
            raise NotFound(f"datastore {self.datastore.id}: cannot read {path}: "
                           f"{result.stderr.decode('utf-8', 'replace').strip()}")
        if len(result.stdout) > MAX_SMALL_FILE:
            raise DriverError(f"datastore {self.datastore.id}: {path} is larger than {MAX_SMALL_FILE} bytes")
        return result.stdout

    async def stat(self, vm_id: int, source: str, disk_id: int) -> int:
        """Virtual size (MB) of disk ``disk_id`` as recorded in the backup's vm.xml."""
        return layout.disk_size_mb(await self.read_file(vm_id, source, layout.VM_XML), disk_id)

    async def list_backup(self, vm_id: int, source: str) -> list[str]:
        directory = self.layout.backup_dir(vm_id, source)
        result = await self.server.run(["find", directory, "-mindepth", "1", "-maxdepth", "1", "-printf", "%f\\n"],
                                       timeout=self.command_timeout, check=False)
        if result.exit_status != 0:
            raise NotFound(f"datastore {self.datastore.id}: no backup {source} of VM {vm_id} ({directory})")
        return sorted(result.stdout.decode().splitlines())

    async def verify_files(self, vm_id: int, source: str, names: Sequence[str], disks: Collection[str],
                           timeout: float) -> tuple[dict[str, str], dict[str, ImageCheck]]:  # noqa: ASYNC109
        """Each file read where it lies on the server: its sha256, and ``qemu-img check`` of those in ``disks``."""
        paths = {name: self.layout.file_path(vm_id, source, name) for name in names}
        digests = await hash_files(self.server, list(paths.values()), timeout) if paths else {}
        checks = {name: await qemu_img_check(self.server, paths[name], timeout) for name in names if name in disks}
        return {name: digests[path] for name, path in paths.items()}, checks

    async def rm(self, vm_id: int, sources: Sequence[str]) -> None:
        """Remove the directories of every increment; an error when none of them existed."""
        dirs = [self.layout.backup_dir(vm_id, source) for source in sources]
        if not dirs:
            raise ValidationError("rm: no backup sources given")
        result = await self.server.run(["sh", "-c", _RM, "sh", *dirs], timeout=self.command_timeout, check=False)
        if result.exit_status == 3:
            raise NotFound(f"datastore {self.datastore.id}: nothing to remove for VM {vm_id}: "
                           f"{', '.join(sources)}")
        if result.exit_status != 0:
            raise CommandFailed(["rm", "-rf", *dirs], result.exit_status, result.stderr,
                                host=getattr(self.server, "host", None))

    async def cleanup_partial(self, vm_id: int) -> list[str]:
        """Remove the VM's ``.tmp-*`` upload leftovers; returns their backup ids."""
        out = await self._run(["sh", "-c", _CLEANUP, "sh", self.layout.vm_dir(vm_id)])
        removed = [layout.tmp_backup_id(line.rsplit("/", 1)[-1]) or line for line in out.decode().splitlines()]
        if removed:
            log.info("datastore %s: removed partial uploads of VM %s: %s", self.datastore.id, vm_id, removed)
        return removed

    async def flatten(self, request: FlattenRequest, sink: DriverSink = NO_SINK) -> UploadResult:
        """Merge the links on the server into ``.tmp-<backup_id>`` (qemu-img reads them in place), copy the last
        link's descriptions beside, hash, and rename the directory into place."""
        vm_id, (last, newest) = request.vm_id, request.links[-1]
        tmp = await self._begin(vm_id, request.backup_id)
        try:
            names = [layout.disk_file_name(disk_id, last) for disk_id in request.disk_ids]
            for disk_id, name in zip(request.disk_ids, names, strict=True):
                chain = [self.layout.file_path(vm_id, source, layout.disk_file_name(disk_id, n))
                         for n, source in request.links]
                await self.server.run(merge.convert_argv(chain, f"{tmp}/{name}"), timeout=request.timeout,
                                      started=on_side(sink.process_started, "server"))
            descriptions = [self.layout.file_path(vm_id, newest, name) for name in (layout.VM_XML, layout.DOMAIN_XML)]
            await self._run(["cp", "--", *descriptions, tmp])
            paths = [f"{tmp}/{name}" for name in (*names, layout.VM_XML, layout.DOMAIN_XML)]
            digests = await hash_files(self.server, paths, request.timeout)
            sizes = await staged_sizes(self.server, paths, request.timeout)
            await self._commit(vm_id, request.backup_id)
        except BaseException:
            await shielded(self._discard(tmp))
            raise
        return UploadResult(size_mb=math.ceil(sum(b for _, b in sizes) / MIB),
                            sha256={path.rsplit("/", 1)[-1]: digest for path, digest in digests.items()})

    # --- upload scaffolding: temporary directory, commit, discard, progress ----------------------------------

    async def _begin(self, vm_id: int, backup_id: str) -> str:
        """Create the empty ``.tmp-<backup_id>`` directory (refused when the backup exists already)."""
        final, tmp = self.layout.backup_dir(vm_id, backup_id), self.layout.tmp_dir(vm_id, backup_id)
        argv = ["sh", "-c", _NEW_DIR, "sh", self.layout.vm_dir(vm_id), final, tmp]
        result = await self.server.run(argv, timeout=self.command_timeout, check=False)
        if result.exit_status == 3:
            raise DriverError(f"datastore {self.datastore.id}: backup {backup_id} of VM {vm_id} exists already")
        if result.exit_status != 0:
            raise CommandFailed(argv, result.exit_status, result.stderr, host=getattr(self.server, "host", None))
        if result.stdout.strip():
            log.info("datastore %s: removed partial uploads of VM %s left by earlier attempts: %s", self.datastore.id,
                     vm_id, result.stdout.decode("utf-8", "replace").split())
        return tmp

    async def _commit(self, vm_id: int, backup_id: str) -> None:
        await self._run(["mv", "-T", "--", self.layout.tmp_dir(vm_id, backup_id),
                         self.layout.backup_dir(vm_id, backup_id)])

    async def _discard(self, tmp: str) -> None:
        """``rm -rf`` the partial upload, again while a receiver that is being torn down still adds files."""
        for _ in range(DISCARD_ATTEMPTS):
            try:
                result = await self.server.run(["rm", "-rf", "--", tmp], timeout=self.command_timeout, check=False)
            except DriverError as exc:
                log.warning("datastore %s: cannot remove partial upload %s: %s", self.datastore.id, tmp, exc)
                return
            if result.exit_status == 0:
                return
        log.warning("datastore %s: partial upload %s still there; cleanup_partial will retry",
                    self.datastore.id, tmp)

    async def _report_progress(self, tmp: str, totals: asyncio.Future[dict[str, int]], progress: Progress) -> None:
        """Feed ``progress`` with the apparent sizes of the files in the temporary directory until
        cancelled."""
        expected = await totals

        async def probe() -> None:
            out = await self._run(["sh", "-c", _TREE_SIZES, "sh", tmp], check=False)
            progress(file_progress(out, expected), expected)

        await keep_probing(probe, self.progress_interval, f"datastore {self.datastore.id}: upload into {tmp}")

    async def _upload(self, source: Runner, paths: list[str], vm_id: int, backup_id: str, timeout: float,  # noqa: ASYNC109
                      transfer: Callable[[str], Coroutine[Any, Any, None]],
                      progress: Progress | None, nice: int | None, ionice: int | None,
                      started: ProcessStarted | None = None) -> UploadResult:
        """Stat, hash and ``transfer(tmp)`` at the same time; rename the directory when all succeeded."""
        tmp = await self._begin(vm_id, backup_id)
        names = [path.rsplit("/", 1)[-1] for path in paths]

        async def totals() -> dict[str, int]:
            return {name: apparent for name, (apparent, _) in zip(names, await sizes, strict=True)}

        try:
            async with asyncio.TaskGroup() as group:
                sizes = group.create_task(staged_sizes(source, paths, timeout))
                digests = group.create_task(hash_files(source, paths, timeout, nice, ionice,
                                                       on_side(started, "source")))
                copy = group.create_task(transfer(tmp))
                if progress is not None:
                    probe = group.create_task(self._report_progress(tmp, asyncio.ensure_future(totals()), progress))
                    copy.add_done_callback(lambda _: probe.cancel())
            await self._commit(vm_id, backup_id)
        except BaseException as exc:
            await shielded(self._discard(tmp))
            if isinstance(exc, BaseExceptionGroup):
                raise first_error(exc) from None
            raise
        if progress is not None:
            final = await totals()
            progress(final, final)
        allocated = sum(b for _, b in sizes.result())
        hashes = {path.rsplit("/", 1)[-1]: digest for path, digest in digests.result().items()}
        return UploadResult(size_mb=math.ceil(allocated / MIB), sha256=hashes)


async def keep_probing(probe: Callable[[], Awaitable[None]], interval: float, what: str) -> None:
    """``probe()`` every ``interval`` seconds until cancelled; best effort: a failing probe ends the reports
    (logged), never the work they describe."""
    while True:
        try:
            await probe()
        except DriverError as exc:
            log.info("%s: no more progress reports: %s", what, exc)
            return
        await asyncio.sleep(interval)


def on_side(started: ProcessStarted | None, side: str) -> Callable[[int], Awaitable[None]] | None:
    """A runner's ``started`` hook that tells ``started`` which side ran the command."""
    if started is None:
        return None

    async def hook(pgid: int) -> None:
        await started(side, pgid)

    return hook


def staged_paths(staging_dir: str, files: Sequence[str]) -> list[str]:
    """Absolute paths of the staged files, every part checked (no '..', no '/' in names, no duplicates)."""
    directory = layout.check_path(staging_dir, "staging directory")
    names = [layout.check_file_name(name) for name in files]
    if not names:
        raise ValidationError("upload: no files given")
    if len(set(names)) != len(names):
        raise ValidationError(f"upload: duplicate file names in {names}")
    return [f"{directory}/{name}" for name in names]


def rsync_ssh(ssh_command: Sequence[str], port: int | None) -> str:
    """rsync's ``-e`` value: the caller's ssh argv, with ``-p port`` added unless it names a port itself."""
    words = list(ssh_command)
    if port is not None and "-p" not in words:
        words[1:1] = ["-p", str(port)]
    return shlex.join(words)
