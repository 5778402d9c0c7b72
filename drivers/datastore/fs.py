"""The ``fs`` backup datastore: directories on the scheduler's own machine, under BASE_PATH.

The hypervisor's staged files reach it in one of two ways:

* the hypervisor *is* this machine (the source runner has no SSH target): ``cp --sparse=always``;
* a remote hypervisor: this machine pulls with ``rsync`` over ssh (the caller's ssh command, with the
  hypervisor's verified host key). This is the one case where the scheduler's machine carries disk data,
  because it is the backup target itself.

Either way the files land in ``<BASE_PATH>/<vm_id>/.tmp-<backup_id>/``, renamed to ``<backup_id>`` only when
all arrived, and their sha256 is computed on the hypervisor while they are copied. Attributes (spec §11
naming): ``FS_ARGS`` (rsync options for the pull, default ``-aS``), ``FS_BWLIMIT``, ``FS_NICE``,
``FS_IONICE``, ``BASE_PATH``, ``LIMIT_MB``.
"""

from __future__ import annotations

from collections.abc import Sequence

from drivers.commands import Runner
from drivers.datastore.base import (
    COMMAND_TIMEOUT,
    PROGRESS_INTERVAL,
    FetchRequest,
    ProcessStarted,
    Progress,
    TreeDatastore,
    UploadRequest,
    UploadResult,
    fetch_each,
    on_side,
    rsync_ssh,
    staged_paths,
)
from drivers.datastore.limits import priority
from drivers.datastore.rsync import DEFAULT_SSH, RunnerFactory, remote, rsync_options, run_rsync
from drivers.local import LocalRunner
from drivers.sink import NO_SINK, DriverSink
from drivers.sshtarget import SshTarget
from scheduler.model.objects.datastore import Datastore


class FsDatastore(TreeDatastore):
    """Backups as directories under BASE_PATH on this machine."""

    def __init__(self, datastore: Datastore, server: Runner | None = None, *,
                 command_timeout: float = COMMAND_TIMEOUT, progress_interval: float = PROGRESS_INTERVAL) -> None:
        super().__init__(datastore, server or LocalRunner(), command_timeout=command_timeout,
                         progress_interval=progress_interval)
        self.options = rsync_options(datastore, "FS")
        self.nice, self.ionice = priority(datastore, "FS")

    @classmethod
    def connect(cls, datastore: Datastore, pool: RunnerFactory, **settings: float) -> FsDatastore:
        return cls(datastore, None, **settings)

    async def upload(self, request: UploadRequest, sink: DriverSink = NO_SINK) -> UploadResult:
        """Copy (local hypervisor) or pull (remote one) ``files`` of ``staging_dir`` into ``backup_id``."""
        source, staging_dir, files, timeout = request.source, request.staging_dir, request.files, request.timeout
        vm_id, backup_id, ssh_command = request.vm_id, request.backup_id, request.ssh_command
        progress: Progress | None = sink.files_progress if request.progress else None
        started: ProcessStarted = sink.process_started
        paths = staged_paths(staging_dir, files)
        hypervisor: SshTarget | None = getattr(source, "target", None)

        async def transfer(tmp: str) -> None:
            if hypervisor is None:
                argv = ["cp", "--sparse=always", "--preserve=mode,timestamps", "--", *paths, f"{tmp}/"]
            else:
                shell = rsync_ssh(ssh_command or DEFAULT_SSH, hypervisor.port)
                argv = ["rsync", *self.options, "-e", shell, "--",
                        *(f"{remote(hypervisor)}:{path}" for path in paths), f"{tmp}/"]
            await run_rsync(self.server, argv, timeout=timeout, nice=self.nice, ionice=self.ionice,
                            started=on_side(started, "server"))

        return await self._upload(source, paths, vm_id, backup_id, timeout, transfer, progress,
                                  self.nice, self.ionice, started)

    async def fetch(self, request: FetchRequest, sink: DriverSink = NO_SINK) -> None:
        """Copy (local hypervisor) or push with rsync over ssh (remote one) the file to the destination."""
        source = self.layout.file_path(request.vm_id, request.backup_id, request.name)
        hypervisor: SshTarget | None = getattr(request.target, "target", None)
        if hypervisor is None:
            argv = ["cp", "--sparse=always", "--", source, request.destination]
        else:
            shell = rsync_ssh(request.ssh_command or DEFAULT_SSH, hypervisor.port)
            argv = ["rsync", *self.options, "-e", shell, "--", source, f"{remote(hypervisor)}:{request.destination}"]
        await self.server.run(argv, timeout=request.timeout, nice=self.nice, ionice=self.ionice,
                              started=on_side(sink.process_started, "local"))
        return None

    async def fetch_all(self, requests: Sequence[FetchRequest], sink: DriverSink = NO_SINK) -> list[str | None]:
        """One copy per file, a few at a time."""
        return await fetch_each(self.fetch, requests, sink)
