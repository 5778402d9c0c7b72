"""The datastore drivers' upload, called as the tests like it: the request's fields as arguments, progress
and process groups to plain callbacks."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from drivers.commands import Runner
from drivers.datastore.base import BackupDatastore, UploadRequest, UploadResult
from drivers.sink import NoSink

FilesProgress = Callable[[Mapping[str, int], Mapping[str, int]], None]
ProcessStarted = Callable[[str, int], Awaitable[None]]


class CallbackSink(NoSink):
    def __init__(self, progress: FilesProgress | None, started: ProcessStarted | None) -> None:
        self.progress, self.started = progress, started

    async def process_started(self, side: str, pgid: int) -> None:
        if self.started is not None:
            await self.started(side, pgid)

    def files_progress(self, done: Mapping[str, int], total: Mapping[str, int]) -> None:
        if self.progress is not None:
            self.progress(done, total)


async def upload(store: BackupDatastore, source: Runner, staging_dir: str, files: Sequence[str], vm_id: int,
                 backup_id: str, *, timeout: float, ssh_command: Sequence[str] | None = None,  # noqa: ASYNC109
                 progress: FilesProgress | None = None, started: ProcessStarted | None = None) -> Any:
    request = UploadRequest(source, staging_dir, files, vm_id, backup_id, timeout=timeout, ssh_command=ssh_command,
                            progress=progress is not None)
    result: UploadResult = await store.upload(request, CallbackSink(progress, started))
    return result
