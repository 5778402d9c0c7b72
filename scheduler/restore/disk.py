"""One disk of a backup image brought onto a hypervisor, verified before it appears (spec §8.2, §8.4).

:func:`fetch_disk` copies ``disk.<disk_id>.0`` of a BACKUP image to ``<target>.vmsched-fetch-<run>.part``
next to the target file on the hypervisor, checks its sha256 against the one the image recorded at backup
time (``TEMPLATE/CHECKSUMS``) and runs ``qemu-img check`` on it; a raw target is then converted on the
hypervisor (into ``<target>.vmsched-raw-<run>.part``). Only then is the result renamed to the target path.
On any failure (cancellation included) the temporary files go and nothing else has changed.

The data goes between the backup server and the hypervisor directly:

* ``rsync`` datastore: the hypervisor pulls with rsync over its ssh to the backup server (the key and the
  verified known_hosts of the upload: :func:`scheduler.backup.run.upload_ssh`);
* ``fs`` datastore (a directory on the scheduler's machine): the scheduler pushes, ``cp`` when the
  hypervisor is this machine, else rsync over ssh with sched.conf's SSH settings.

Every temporary file is journaled (``{"restore": "temp", "host": id, "path": ...}``) before it exists; its
path names the run, so :func:`remove_temps` and the process killer (``drivers.processes``) find it again.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from drivers.commands import CommandFailed, shielded
from drivers.datastore import DRIVERS, FetchRequest, open_datastore, remove_leftovers, server_of
from drivers.datastore.base import hash_files, on_side
from drivers.datastore.layout import check_path, disk_file_name
from drivers.datastore.limits import io_limits
from drivers.sink import NoSink
from scheduler.backup.chain import being_flattened
from scheduler.backup.transport import upload_ssh
from scheduler.backup.urls import Chain, chain_up_to, image_chain
from scheduler.errors import ActionError, ValidationError
from scheduler.hosts.links import HostLinks
from scheduler.model.objects.datastore import Datastore
from scheduler.model.objects.image import Image
from scheduler.model.objects.states import ImageType
from scheduler.restore.steps import STEPS, Temp
from scheduler.store.state import State

log = logging.getLogger(__name__)

FETCH_TIMEOUT = 6 * 3600.0  # seconds: the copy, the hash, the check and the convert of one disk
COMMAND_TIMEOUT = 120.0
STEP = STEPS.key  # the key of the journal steps of a restore
FORMATS = ("qcow2", "raw")
STORED_FORMAT = "qcow2"  # what a backup's disk.<id>.<inc> file is
# each file ($2, $3, ...) backed by the one before it, by relative name (they share a directory)
_REBASE_ONTO_PREVIOUS = (f'while [ "$#" -gt 1 ]; do qemu-img rebase -u -f {STORED_FORMAT} -F {STORED_FORMAT} '
                         '-b "${1##*/}" "$2" || exit; shift; done')
TEMP_KINDS = ("fetch", "raw")  # the first kind's path is also the stem of a chain's later files
# rm -f each path given, and the later files of a chain ("$1".<n>, see link_path)
_REMOVE_TEMPS = 'rm -f -- "$@" "$1".[0-9]*'

QEMU_IMG_CHECK_OK = (0, 3)  # 3: leaked clusters only, which lose no data

StepJournal = Callable[[dict[str, Any]], Awaitable[None]]
# Told each heavy command's process group: ("host" for the hypervisor, "local" for this machine, pgid).
ProcessStarted = Callable[[str, int], Awaitable[None]]


# ---- pure: names, checks, argv ----------------------------------------------------------------------


def temp_path(target_path: str, kind: str, run_id: int) -> str:
    """A temporary file next to ``target_path``: its name carries vmsched, the kind and the run id, and
    ends with ``.part`` so that run 5's name is no prefix of run 53's."""
    if kind not in TEMP_KINDS:
        raise ValueError(f"unknown temporary file kind {kind!r}")
    return f"{target_path}.vmsched-{kind}-{int(run_id)}.part"


def temp_paths(target_path: str, run_id: int) -> list[str]:
    return [temp_path(target_path, kind, run_id) for kind in TEMP_KINDS]


def backup_file(image: Image, disk_id: int) -> str:
    """``disk.<disk_id>.0`` of a BACKUP image; an error naming the image's disks when it has no such disk."""
    if image.type != ImageType.BACKUP:
        raise ActionError(f"image {image.id} is not a backup image (TYPE {image.type.name})")
    if disk_id not in image.backup_disk_ids:
        known = ", ".join(map(str, image.backup_disk_ids)) or "none"
        raise ActionError(f"backup image {image.id} has no disk {disk_id} (its disks: {known})")
    return disk_file_name(disk_id, 0)


def recorded_sha256(image: Image, name: str) -> str:
    """The sha256 the backup recorded for file ``name``; without one nothing can be verified: an error."""
    for vector in image.template.vectors("CHECKSUMS"):
        if vector.get("FILE") == name and len((vector.get("SHA256") or "").strip()) == 64:
            return str(vector["SHA256"]).strip().lower()
    raise ActionError(f"backup image {image.id} records no sha256 for {name}: it cannot be verified, "
                      "so it is not restored")


def backup_vm_id(image: Image) -> int:
    """The VM whose directory holds the backup's files (the image's VMS)."""
    if not image.vms:
        raise ActionError(f"backup image {image.id} names no VM (VMS is empty): its files cannot be found")
    return int(image.vms[0])


def source_datastore(state: State, image: Image) -> Datastore:
    datastore = state.datastores.find(image.datastore_id)
    if datastore is None:
        raise ActionError(f"datastore {image.datastore_id} of backup image {image.id} does not exist")
    if datastore.ds_mad not in DRIVERS:
        raise ActionError(f"restoring from a {datastore.ds_mad!r} datastore (image {image.id}, datastore "
                          f"{datastore.id}) is not supported by this version; rsync, restic and fs are")
    return datastore


def checked_target(target_path: str, target_format: str) -> str:
    if target_format not in FORMATS:
        raise ValidationError(f"restore target format must be one of {', '.join(FORMATS)}, got {target_format!r}")
    return check_path(target_path, "restore target path")


def step(name: str, **fields: Any) -> dict[str, Any]:
    """A restore step's journal entry as JSON (what ``STEPS.entry`` writes for the typed step)."""
    return {STEP: name, **fields}


# ---- the fetch -----------------------------------------------------------------------------------------


async def fetch_disk(links: HostLinks, state: State, image: Image, disk_id: int, host: Any, target_path: str,
                     target_format: str, *, run_id: int, journal: StepJournal | None = None,
                     started: ProcessStarted | None = None, increment_id: int = -1) -> None:
    """Put disk ``disk_id`` of backup ``image`` (as it was at increment ``increment_id`` of its chain; -1:
    the last) at ``target_path`` on ``host``, in ``target_format`` (``qcow2`` or ``raw``). Each file of the
    chain is verified against the image's recorded sha256, the chain is linked up (each increment onto the
    copy of the one before) and committed into the copy of the base (`qemu-img commit`: only what the
    increments hold is written), which `qemu-img check` checks, then becomes the disk;
    an existing ``target_path`` is replaced only once all of that succeeded. ``journal`` is told each
    temporary file before it exists; ``started`` each heavy command's process group."""
    target = checked_target(target_path, target_format)
    links_of = chain_links(image, disk_id, increment_id)
    datastore = source_datastore(state, image)
    runner = links.runner(host)
    fetched = [link_path(temp_path(target, "fetch", run_id), n) for n in range(len(links_of))]
    try:
        ssh = await upload_ssh(links, host, runner, datastore, share=False)
        store = open_datastore(datastore, links.pool)
        requests = [FetchRequest(runner, backup_vm_id(image), source, name, path, FETCH_TIMEOUT, ssh_command=ssh,
                                 label=restore_label(run_id)) for (source, name), path in zip(links_of, fetched, strict=True)]
        for path in fetched:
            await _journal(journal, STEPS.entry(Temp(host.id, path)))
        try:
            digests = await store.fetch_all(requests, _Started(started))
        except CommandFailed as exc:
            server = server_of(datastore)
            names = ", ".join(name for _, name in links_of)
            raise ActionError(f"copying {names} of backup image {image.id} from "
                              f"{f'backup server {server}' if server else 'this machine'} (datastore "
                              f"{datastore.id}) to {host.name}:{target} failed: {exc}; nothing was "
                              "restored") from exc
        for (_, name), path, digest in zip(links_of, fetched, digests, strict=True):
            await _verify_sha256(runner, datastore, path, recorded_sha256(image, name),
                                 f"{name} of backup image {image.id}", started, digest)
        if len(fetched) > 1:
            # each increment reads through the one before, then all are written into the base's copy: only
            # what they hold moves. No flush (cache "unsafe"): the copy is a temporary file until the rename,
            # as durable as a single fetched file is (a crash before the rename discards it).
            await _run(runner, ["sh", "-c", _REBASE_ONTO_PREVIOUS, "sh", *fetched], started, COMMAND_TIMEOUT)
            await _run(runner, ["qemu-img", "commit", "-q", "-d", "-t", "unsafe", "-f", STORED_FORMAT,
                                "-b", fetched[0], fetched[-1]], started, FETCH_TIMEOUT)
        await _check(runner, fetched[0], started)
        final = fetched[0]
        if target_format == "raw":
            final = temp_path(target, "raw", run_id)
            await _journal(journal, STEPS.entry(Temp(host.id, final)))
            await _run(runner, ["qemu-img", "convert", "-q", "-f", STORED_FORMAT, "-O", "raw", fetched[0], final],
                       started, FETCH_TIMEOUT)
        await runner.run(["mv", "-f", "-T", "--", final, target], timeout=COMMAND_TIMEOUT)
    finally:
        await shielded(remove_temps(runner, target, run_id))
    log.info("disk %s of backup image %s restored up to %s to %s:%s (%s, %d file(s), sha256 verified)", disk_id,
             image.id, links_of[-1][1], host.name, target, target_format, len(links_of))


def chain_links(image: Image, disk_id: int, increment_id: int = -1) -> list[tuple[str, str]]:
    """(backup source, file name) of each file disk ``disk_id`` of the image is made of, base first, up to
    ``increment_id`` (-1: the last)."""
    backup_file(image, disk_id)
    return [(source, disk_file_name(disk_id, n)) for n, source in chain_to(image, increment_id)]


def chain_to(image: Image, increment_id: int = -1) -> Chain:
    """The image's chain up to increment ``increment_id`` (-1: all of it); an error naming the image's
    increments when it has no such one (or while its oldest increments are being merged)."""
    if being_flattened(image):
        raise ActionError(f"backup image {image.id}: its oldest increments are being merged (KEEP_LAST); try "
                          "again when that is done", retryable=True)
    try:
        return chain_up_to(image_chain(image), increment_id)
    except ValidationError:
        known = ", ".join(str(n) for n, _ in image_chain(image))
        raise ActionError(f"backup image {image.id} has no increment {increment_id} (its increments: "
                          f"{known})") from None


def link_path(first: str, n: int) -> str:
    """The temporary file of the n-th file of a chain: the first one's path, then ``.<n>`` (so that a marker
    naming the first finds them all)."""
    return first if n == 0 else f"{first}.{n}"


class _Started(NoSink):
    """The drivers' sink of a fetch: only the process groups matter (to the crash tests)."""

    def __init__(self, started: ProcessStarted | None) -> None:
        self.started = started

    async def process_started(self, side: str, pgid: int) -> None:
        if self.started is not None:
            await self.started(side, pgid)


async def _verify_sha256(runner: Any, datastore: Datastore, path: str, expected: str, what: str,
                         started: ProcessStarted | None, digest: str | None = None) -> None:
    """The copy's sha256 (``digest`` when the copy computed it) must be the recorded one."""
    limits = io_limits(datastore)
    if digest is None:
        digest = (await hash_files(runner, [path], FETCH_TIMEOUT, limits.nice, limits.ionice,
                                   on_side(started, "host")))[path]
    if digest != expected:
        raise ActionError(f"{what}: sha256 of the copy is {digest}, the backup recorded {expected}: the backup "
                          "file is damaged or was changed; nothing was restored")


async def _check(runner: Any, path: str, started: ProcessStarted | None) -> None:
    """qemu-img must find the qcow2 (and the chain under it) sound."""
    argv = ["qemu-img", "check", "-q", "-f", STORED_FORMAT, path]
    result = await runner.run(argv, timeout=FETCH_TIMEOUT, check=False, started=on_side(started, "host"))
    if result.exit_status not in QEMU_IMG_CHECK_OK:
        raise CommandFailed(argv, result.exit_status, result.stderr + result.stdout,
                            host=getattr(runner, "host", None))


async def _run(runner: Any, argv: list[str], started: ProcessStarted | None, timeout: float) -> None:  # noqa: ASYNC109
    await runner.run(argv, timeout=timeout, started=on_side(started, "host"))


async def remove_temps(runner: Any, target_path: str, run_id: int) -> None:
    """``rm -f`` the run's temporary files next to ``target_path``; logged, never raised."""
    try:
        await runner.run(["sh", "-c", _REMOVE_TEMPS, "sh", *temp_paths(target_path, run_id)], timeout=COMMAND_TIMEOUT)
        # and what a killed datastore command of this run left (restic dump: its password file)
        await remove_leftovers(runner, restore_label(run_id), COMMAND_TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - a leftover is reported; recovery removes it later
        log.warning("cannot remove the temporary files of run %s next to %s: %s", run_id, target_path, exc)


def restore_label(run_id: int) -> str:
    """What names the password files of a restore's restic commands."""
    return f"restore{int(run_id)}"


async def _journal(journal: StepJournal | None, entry: dict[str, Any]) -> None:
    if journal is not None:
        await journal(entry)
