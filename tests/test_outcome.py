"""The outcome policy (scheduler/engine/outcome.py): an exception's kind, and whether and when to try again."""

from __future__ import annotations

import pytest

from drivers.vmm.errors import VmmError
from scheduler.engine.outcome import CANCELLED, Outcome, OutcomeKind, RetryPolicy, failed, succeeded
from scheduler.errors import ActionError, DriverError, NotFound


@pytest.mark.parametrize(
    ("exc", "kind", "error_class"),
    [
        (DriverError("ssh: connection reset", retryable=True), OutcomeKind.RETRYABLE, "scheduler.errors.DriverError"),
        (DriverError("host key mismatch"), OutcomeKind.PERMANENT, "scheduler.errors.DriverError"),
        (NotFound("VM 7 does not exist"), OutcomeKind.PERMANENT, "scheduler.errors.NotFound"),
        (ActionError("datastore 5 is not a BACKUP_DS"), OutcomeKind.PERMANENT, "scheduler.errors.ActionError"),
        (ActionError("VM 3 is not bound to a host", retryable=True), OutcomeKind.RETRYABLE, "scheduler.errors.ActionError"),
        (ConnectionResetError("peer reset"), OutcomeKind.RETRYABLE, "ConnectionResetError"),
        (TimeoutError(), OutcomeKind.RETRYABLE, "TimeoutError"),
        (TypeError("bad operand"), OutcomeKind.INTERNAL, "TypeError"),
        (AttributeError("no such field"), OutcomeKind.INTERNAL, "AttributeError"),
    ],
)
def test_an_exception_is_classified_by_what_it_says(exc: Exception, kind: OutcomeKind, error_class: str) -> None:
    outcome = failed(exc)
    assert (outcome.kind, outcome.error_class, outcome.success) == (kind, error_class, False)


def test_a_driver_subclass_keeps_its_own_retryable_and_names_its_module() -> None:
    outcome = failed(VmmError("domain lock busy", retryable=True))
    assert (outcome.kind, outcome.error_class) == (OutcomeKind.RETRYABLE, "drivers.vmm.errors.VmmError")


def test_messages_name_the_problem() -> None:
    assert failed(DriverError("disk full")).message == "disk full"
    assert failed(TimeoutError()).message == "TimeoutError"  # no text: the class says it
    assert failed(KeyError("x")).kind is OutcomeKind.RETRYABLE  # not a programming error by itself
    internal = failed(TypeError("unsupported operand"))
    assert internal.message == "internal error (TypeError: unsupported operand); see the daemon's log"


def test_only_retryable_failures_of_retried_actions_are_tried_again_with_doubling_backoff() -> None:
    policy = RetryPolicy(max_retries=3, backoff=60)
    transient = failed(DriverError("reset", retryable=True))
    assert [policy.delay(transient, attempt, retried_action=True) for attempt in (1, 2, 3, 4)] == [60, 120, 240, None]
    assert policy.delay(transient, 1, retried_action=False) is None  # a reboot is not run twice
    for final in (failed(DriverError("key mismatch")), failed(TypeError("x")), CANCELLED, succeeded("ok")):
        assert policy.delay(final, 1, retried_action=True) is None
    assert RetryPolicy(max_retries=0, backoff=60).delay(transient, 1, retried_action=True) is None


def test_success_and_cancellation_carry_no_error_class() -> None:
    assert succeeded("42 MB") == Outcome(OutcomeKind.DONE, "42 MB", "")
    assert (CANCELLED.kind, CANCELLED.error_class, CANCELLED.success) == (OutcomeKind.CANCELLED, "", False)
