"""The small exception tree of vmsched. Messages are built from ids; callers catch at one edge."""

from __future__ import annotations


class VmschedError(Exception):
    """Base of every error vmsched raises on purpose; ``retryable`` says whether trying again may help
    (read by the engine's outcome policy, scheduler/engine/outcome.py)."""

    retryable = False

    def __init__(self, *args: object, retryable: bool | None = None) -> None:
        if retryable is not None:
            self.retryable = retryable
        super().__init__(*args)


class TemplateError(VmschedError):
    """A template (or sched.conf) that does not parse; carries where."""

    def __init__(self, message: str, source: str = "<template>", line: int = 0, column: int = 0) -> None:
        self.message = message
        self.source = source
        self.line = line
        self.column = column
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.line:
            return f"{self.source}:{self.line}:{self.column}: {self.message}"
        return f"{self.source}: {self.message}"


class ConfigError(VmschedError):
    """sched.conf problems, all of them at once."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class ValidationError(VmschedError):
    """A value that parses but is not acceptable (a bad attribute, an out-of-range number)."""


class StoreError(VmschedError):
    """The state database cannot be used (newer schema, corrupt file)."""


class NotFound(VmschedError):
    """An object id that does not exist."""


class AuthError(VmschedError):
    """Wrong or missing credentials."""


class PermissionDenied(VmschedError):
    """Authenticated, but not allowed to do this."""


class ActionError(VmschedError):
    """An operation refused in the object's current state; ``retryable`` when that state may change by
    itself or by an operator's ordinary action (a VM not yet deployed, in the middle of another operation)."""


class DriverError(VmschedError):
    """Something failed on a host; ``retryable`` says whether trying again may help."""

    def __init__(self, message: str, *, host: str | None = None, retryable: bool | None = None) -> None:
        self.host = host
        super().__init__(message, retryable=retryable)
