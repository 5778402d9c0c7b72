"""How a run ended, as data, and what the engine does next: the pure outcome policy.

An action's exception is classified once, here: an error vmsched raises on purpose says itself
whether trying again may help (``retryable``: a driver's transient failure, a VM not yet deployed
or busy); the others are refusals that the same attempt would meet again. A programming error
(``TypeError``, ``AttributeError``...) is an internal error, logged with its traceback by the engine
and never retried; anything else (an ``OSError`` from a dropped connection, a timeout) is treated
as transient, as before this policy existed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from scheduler.errors import VmschedError


class OutcomeKind(enum.StrEnum):
    DONE = "done"
    CANCELLED = "cancelled"  # by an operator
    RETRYABLE = "retryable"  # failed; another attempt may succeed
    PERMANENT = "permanent"  # failed; another attempt would fail the same way
    INTERNAL = "internal"  # a bug in vmsched: logged with its traceback


# Errors that only a mistake in vmsched's own code raises.
PROGRAMMING_ERRORS: tuple[type[BaseException], ...] = (
    TypeError, AttributeError, NameError, AssertionError, ImportError, NotImplementedError, RecursionError,
)  # fmt: skip


@dataclass(frozen=True)
class Outcome:
    kind: OutcomeKind
    message: str = ""
    error_class: str = ""  # the exception's qualified name, "" for success and cancellation

    @property
    def success(self) -> bool:
        return self.kind is OutcomeKind.DONE


def succeeded(message: str = "") -> Outcome:
    return Outcome(OutcomeKind.DONE, message)


CANCELLED = Outcome(OutcomeKind.CANCELLED, "cancelled")


def failed(exc: BaseException) -> Outcome:
    cls = type(exc)
    name = cls.__name__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    message = str(exc) or cls.__name__
    if isinstance(exc, VmschedError):
        kind = OutcomeKind.RETRYABLE if exc.retryable else OutcomeKind.PERMANENT
    elif isinstance(exc, PROGRAMMING_ERRORS):
        kind, message = OutcomeKind.INTERNAL, f"internal error ({cls.__name__}: {message}); see the daemon's log"
    else:
        kind = OutcomeKind.RETRYABLE
    return Outcome(kind, message, name)


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int  # sched.conf RETRY/MAX: retries after the first attempt
    backoff: float  # seconds before the first retry, doubled for each further one

    def delay(self, outcome: Outcome, attempt: int, retried_action: bool) -> float | None:
        """Seconds until the next attempt, or None when ``outcome`` is final.

        ``attempt`` is the attempt that just ended (1 for the first); ``retried_action``: whether the
        action is one that is retried at all (backups are; a reboot is not run twice)."""
        if outcome.kind is not OutcomeKind.RETRYABLE or not retried_action or attempt > self.max_retries:
            return None
        return self.backoff * 2.0 ** (attempt - 1)


__all__ = ["CANCELLED", "Outcome", "OutcomeKind", "RetryPolicy", "failed", "succeeded"]
