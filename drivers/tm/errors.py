"""The transfer driver's errors: a capture that could not finish, and a chain that cannot go on."""

from __future__ import annotations

from scheduler.errors import DriverError


class CaptureError(DriverError):
    """A capture or its cleanup could not finish; the message says what is left and where."""


class ChainBroken(CaptureError):
    """An increment cannot continue its chain (its previous checkpoint is gone, a disk was resized): the
    backup starts a new chain with a full base instead. ``reason`` says why, without the host and domain."""

    def __init__(self, where: str, reason: str, *, cause: str, host: str | None = None) -> None:
        super().__init__(f"{where}: {reason}; a new chain starts with a full backup", host=host)
        self.reason = reason
        self.cause = cause  # a short code: "resized", "checkpoint"
