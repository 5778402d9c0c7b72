"""The ``backup`` action: ARGS ``ds_id[,reset]`` (spec §2.8), reset ``0`` or ``1``; one token means
reset 0. At schedule time the datastore must exist and be a backup datastore, and the VM must not
belong to a backup job (whose backups the job schedules: OpenNebula would leave such an action due
forever, spec §3.1)."""

from __future__ import annotations

from dataclasses import dataclass

from scheduler.actions.base import ActionSpec, RunContext, bool_token, int_token, malformed, split_args
from scheduler.backup.run import perform
from scheduler.errors import ValidationError
from scheduler.model import backup_config as backups
from scheduler.model.objects.states import DatastoreType
from scheduler.model.objects.vm import Vm
from scheduler.store.state import State

NAME = "backup"
ARGS_FORMAT = "ds_id[,reset]"


@dataclass(frozen=True)
class BackupArgs:
    ds_id: int
    reset: bool = False


def parse_args(args: str) -> BackupArgs:
    tokens = split_args(args)
    if not 1 <= len(tokens) <= 2:
        raise malformed(NAME, ARGS_FORMAT)
    ds_id = int_token(tokens[0])
    reset = bool_token(tokens[1]) if len(tokens) == 2 else False
    if ds_id is None or reset is None:
        raise malformed(NAME, ARGS_FORMAT)
    return BackupArgs(ds_id, reset)


def validate(args: str) -> None:
    parse_args(args)


def check(state: State, vm: Vm, args: str) -> None:
    ds_id = parse_args(args).ds_id
    datastore = state.datastores.find(ds_id)
    if datastore is None:
        raise ValidationError(f"Error getting datastore [{ds_id}]")
    if datastore.type != DatastoreType.BACKUP_DS:
        raise ValidationError(f"Datastore {ds_id} is not of type BACKUP")
    job = backups.member_of_job(vm.backup_config)
    if job is not None:
        raise ValidationError(f"VM {vm.id} is part of backup job {job}, which schedules its backups")


async def run(ctx: RunContext) -> str | None:
    """A backup into the datastore of ARGS (``scheduler.backup.run``): a full one, or in MODE=INCREMENT the
    next link of the VM's chain; ``reset`` starts a new chain (spec §6.6)."""
    args = parse_args(ctx.args)
    return await perform(ctx, args.ds_id, reset=args.reset)


SPECS = (ActionSpec(NAME, "backup", True, validate, run, args_format=ARGS_FORMAT, check=check),)
