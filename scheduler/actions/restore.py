"""The ``restore`` run: an in-place restore requested by ``one.vm.restore`` (spec §8.4).

It goes through the engine like a one-shot backup, so it is journaled, serialised with the VM's other
actions and recovered after a crash; but it is no SCHED_ACTION: OpenNebula's VM_ACTIONS do not include it,
and the schedule hook refuses every name outside them. ARGS ``image_id,increment_id,disk_id`` (-1: the last
increment, every disk), written by the API and read back here.
"""

from __future__ import annotations

from scheduler.actions.base import ActionSpec, RunContext, int_token, malformed, split_args
from scheduler.restore.in_place import LAST, RestoreArgs, perform

NAME = "restore"
ARGS_FORMAT = "image_id,increment_id,disk_id"


def parse_args(args: str) -> RestoreArgs:
    tokens = split_args(args)
    numbers = [int_token(token) for token in tokens]
    if len(numbers) != 3 or any(n is None for n in numbers):
        raise malformed(NAME, ARGS_FORMAT)
    image_id, increment_id, disk_id = (int(n) for n in numbers if n is not None)
    if image_id < 0 or increment_id < LAST or disk_id < LAST:
        raise malformed(NAME, ARGS_FORMAT)
    return RestoreArgs(image_id, increment_id, disk_id)


def validate(args: str) -> None:
    parse_args(args)


async def run(ctx: RunContext) -> str | None:
    return await perform(ctx, parse_args(ctx.args))


SPECS = (ActionSpec(NAME, "restore", False, validate, run, args_format=ARGS_FORMAT),)
