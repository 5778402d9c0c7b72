"""The command runner contract, run against the local runner and against the SSH pool on a realenv host.

Every test here takes the parametrized ``runner`` fixture, so both runners pass the same suite. The realenv
"hosts" are sshd instances on this machine, so process checks (``pgrep -f``) and canary files work for
both. SSH-only behaviour (host keys, reconnects, the shared connection) lives in ``test_ssh.py``.
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from drivers.commands import CommandFailed, CommandTimeout, Runner
from drivers.local import LocalRunner
from drivers.processes import kill_marked
from drivers.ssh import SshPool, SshSettings, SshTarget
from scheduler.errors import DriverError
from tests.realenv.model import RealEnv

KILL_GRACE = 1.0


def ssh_pool(env: RealEnv, known_hosts: Path | None = None, **settings: object) -> SshPool:
    return SshPool(SshSettings(known_hosts=known_hosts or env.ssh.known_hosts, key=env.ssh.client_key,
                               connect_timeout=5, **settings))  # type: ignore[arg-type]


def host1(env: RealEnv) -> SshTarget:
    host = env.host("host1")
    return SshTarget(host.address, host.ssh_port, host.user)


@pytest.fixture(params=["local", pytest.param("ssh", marks=pytest.mark.realenv)])
async def runner(request: pytest.FixtureRequest) -> AsyncIterator[Runner]:
    if request.param == "local":
        yield LocalRunner(kill_grace=KILL_GRACE)
        return
    env = request.getfixturevalue("realenv")
    pool = ssh_pool(env, kill_grace=KILL_GRACE)
    yield pool.runner(host1(env))
    await pool.close()


def new_marker() -> str:
    """A ``sleep`` duration nobody else uses (``1000.<digits>``), so ``pgrep -f`` finds only our processes."""
    return f"1000.{secrets.randbelow(10**12):012d}"


def processes_with(marker: str) -> list[str]:
    found = subprocess.run(["pgrep", "-af", marker], capture_output=True, text=True, check=False).stdout
    return [line for line in found.splitlines() if "pgrep" not in line]


async def wait_for_processes(marker: str, count: int, within: float = 10) -> None:
    """Until ``count`` processes carry ``marker``; polled, since nothing announces a remote process start."""
    async with asyncio.timeout(within):
        while len(processes_with(marker)) < count:  # noqa: ASYNC110 - no event to await
            await asyncio.sleep(0.02)


async def wait_gone(marker: str, within: float = 5) -> None:
    try:
        async with asyncio.timeout(within):
            while processes_with(marker):  # noqa: ASYNC110 - no event to await
                await asyncio.sleep(0.02)
    except TimeoutError:
        pytest.fail(f"still running {within} s later: {processes_with(marker)}")


def group_of_sleepers(marker: str, *, ignore_term: bool = False) -> list[str]:
    """A shell with two background sleeps: three processes in one group, each showing ``marker``."""
    trap = 'trap "" TERM; ' if ignore_term else ""
    return ["sh", "-c", f"{trap}sleep {marker} & sleep {marker} & wait; : {marker}"]


async def test_output_and_exit_status(runner: Runner) -> None:
    result = await runner.run(["sh", "-c", "printf out; printf err >&2"], timeout=10)
    assert (result.exit_status, result.stdout, result.stderr) == (0, b"out", b"err")
    assert result.duration > 0


async def test_input_arrives_byte_exact(runner: Runner) -> None:
    data = bytes(range(256)) * 64 + b"\n\0end"
    assert (await runner.run(["cat"], timeout=10, input=data)).stdout == data


async def test_without_input_stdin_is_at_end(runner: Runner) -> None:
    assert (await runner.run(["cat"], timeout=10)).stdout == b""


async def test_command_failed_keeps_status_and_stderr_tail(runner: Runner) -> None:
    script = "head -c 5000 /dev/zero | tr '\\0' x >&2; echo ' TAIL-OF-STDERR' >&2; exit 3"
    with pytest.raises(CommandFailed) as caught:
        await runner.run(["sh", "-c", script], timeout=10)
    error = caught.value
    assert error.exit_status == 3 and not error.retryable
    assert error.stderr_tail.endswith("TAIL-OF-STDERR") and 2000 <= len(error.stderr_tail) <= 2048
    assert "exited with status 3" in str(error) and "TAIL-OF-STDERR" in str(error)


async def test_check_false_returns_the_failure(runner: Runner) -> None:
    result = await runner.run(["sh", "-c", "exit 4"], timeout=10, check=False)
    assert result.exit_status == 4


async def test_missing_program_is_status_127(runner: Runner) -> None:
    with pytest.raises(CommandFailed) as caught:
        await runner.run(["vmsched-no-such-program"], timeout=10)
    assert caught.value.exit_status == 127


HOSTILE_ARGUMENTS = [
    "plain",
    "two words",
    "",
    "it's",
    '"double"',
    "; touch {canary}",
    "$(touch {canary})",
    "`touch {canary}`",
    "'; touch {canary}; '",
    "\"; touch {canary}; \"",
    "x\ntouch {canary}",
    "| touch {canary}",
    "&& touch {canary}",
    "> {canary}",
    "*",
    "-n",
    "-e",
    "--",
    "$HOME ${PATH} $1 $@ $$",
    "back\\slash \\n",
    "tab\there",
    "ünïcødé ✓",
    "!event",
    "~",
]


@pytest.mark.parametrize("template", HOSTILE_ARGUMENTS)
async def test_arguments_arrive_byte_exact_and_run_nothing(runner: Runner, tmp_path: Path, template: str) -> None:
    canary = tmp_path / "CANARY"
    argument = template.replace("{canary}", str(canary))
    result = await runner.run(["printf", "%s\\0", argument, "after"], timeout=10)
    assert result.stdout == argument.encode() + b"\0after\0"
    assert not canary.exists()


async def test_all_hostile_arguments_in_one_argv(runner: Runner, tmp_path: Path) -> None:
    canary = tmp_path / "CANARY"
    arguments = [template.replace("{canary}", str(canary)) for template in HOSTILE_ARGUMENTS]
    result = await runner.run(["printf", "%s\\0", *arguments], timeout=10, env={"VMSCHED_VALUE": arguments[5]})
    assert result.stdout.split(b"\0")[:-1] == [a.encode() for a in arguments]
    assert not canary.exists()


async def test_environment_values_are_not_interpreted(runner: Runner, tmp_path: Path) -> None:
    canary = tmp_path / "CANARY"
    value = f"a b; $(touch {canary}) `touch {canary}` '\""
    result = await runner.run(["sh", "-c", 'printf %s "$VMSCHED_VALUE"'], timeout=10, env={"VMSCHED_VALUE": value})
    assert result.stdout == value.encode()
    assert not canary.exists()


async def test_nice_and_ionice_prefixes_apply(runner: Runner) -> None:
    result = await runner.run(["sh", "-c", "ps -o ni= -p $$; ionice -p $$"], timeout=10, nice=7, ionice=5)
    niceness, io_class = result.stdout.decode().splitlines()
    assert int(niceness) == 7
    assert io_class.strip() == "best-effort: prio 5"


async def test_without_priorities_nothing_is_prefixed(runner: Runner) -> None:
    result = await runner.run(["sh", "-c", "ps -o ni= -p $$"], timeout=10)
    assert int(result.stdout) == 0


async def test_timeout_kills_the_whole_process_group(runner: Runner) -> None:
    marker = new_marker()
    command = asyncio.ensure_future(runner.run(group_of_sleepers(marker), timeout=1.5))
    await wait_for_processes(marker, 3)
    with pytest.raises(CommandTimeout) as caught:
        await command
    assert caught.value.retryable and "timed out after 1.5 s" in str(caught.value)
    await wait_gone(marker)


async def test_cancel_kills_the_whole_process_group(runner: Runner) -> None:
    marker = new_marker()
    command = asyncio.ensure_future(runner.run(group_of_sleepers(marker), timeout=60))
    await wait_for_processes(marker, 3)
    command.cancel()
    with pytest.raises(asyncio.CancelledError):
        await command
    await wait_gone(marker)


async def test_cancel_escalates_to_sigkill_for_a_group_ignoring_sigterm(runner: Runner) -> None:
    marker = new_marker()
    command = asyncio.ensure_future(runner.run(group_of_sleepers(marker, ignore_term=True), timeout=60))
    await wait_for_processes(marker, 3)
    command.cancel()
    with pytest.raises(asyncio.CancelledError):
        await command
    await wait_gone(marker, within=KILL_GRACE + 3)


async def test_many_concurrent_commands(runner: Runner) -> None:
    results = await asyncio.gather(*(runner.run(["sh", "-c", 'echo "$1"', "sh", str(i)], timeout=60)
                                     for i in range(25)))
    assert [int(r.stdout) for r in results] == list(range(25))


@pytest.mark.parametrize(
    ("argv", "options", "error"),
    [
        ("echo hi", {}, TypeError),
        ([], {}, ValueError),
        (["echo", b"bytes"], {}, TypeError),
        (["echo", "nul\0byte"], {}, ValueError),
        (["true"], {"nice": 20}, ValueError),
        (["true"], {"ionice": 8}, ValueError),
        (["true"], {"env": {"BAD NAME": "x"}}, ValueError),
        (["true"], {"env": {"X": "nul\0"}}, ValueError),
    ],
)
async def test_refuses_what_cannot_be_passed_safely(runner: Runner, argv: object, options: dict, error: type) -> None:
    with pytest.raises(error):
        await runner.run(argv, timeout=10, **options)  # type: ignore[arg-type]


async def test_started_is_told_the_group_of_the_running_command(runner: Runner) -> None:
    marker = new_marker()
    groups: list[int] = []

    async def started(pgid: int) -> None:
        groups.append(pgid)

    result = await runner.run(["sh", "-c", f"ps -o pgid= -p $$; : {marker}"], timeout=10, started=started)
    assert groups == [int(result.stdout.split()[0])]


async def test_a_failing_started_hook_kills_the_command(runner: Runner) -> None:
    marker = new_marker()

    async def started(pgid: int) -> None:
        await wait_for_processes(marker, 3)
        raise RuntimeError("journal unavailable")

    with pytest.raises(RuntimeError, match="journal unavailable"):
        await runner.run(group_of_sleepers(marker), timeout=60, started=started)
    await wait_gone(marker)


async def test_kill_marked_kills_the_groups_naming_the_marker_and_nothing_else(runner: Runner) -> None:
    """What recovery does after a crash: every group running a command that names the run's marker."""
    marker, other = new_marker(), new_marker()
    group: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def started(pgid: int) -> None:
        group.set_result(pgid)

    command = asyncio.ensure_future(runner.run(group_of_sleepers(marker), timeout=60, started=started))
    bystander = asyncio.ensure_future(runner.run(group_of_sleepers(other), timeout=60))
    pgid = await asyncio.wait_for(group, 10)
    await wait_for_processes(marker, 3)
    await wait_for_processes(other, 3)
    running = processes_with(other)
    assert pgid in await kill_marked(runner, marker)  # (over ssh also the group of setsid -w, its parent)
    await wait_gone(marker)
    assert processes_with(other) == running  # another run's processes: untouched
    [ended] = await asyncio.gather(command, return_exceptions=True)
    assert isinstance(ended, DriverError) or ended.exit_status != 0  # killed, not finished
    assert await kill_marked(runner, marker) == []  # gone: nothing to do
    bystander.cancel()
    await asyncio.gather(bystander, return_exceptions=True)
    await wait_gone(other)
    with pytest.raises(ValueError, match="too short"):
        await kill_marked(runner, "/")
