"""Host monitoring: the pure parts (df, tools, template updates, messages) and the monitor's loop over a
real state with injected host faults."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from drivers import hostkeys
from drivers.commands import CommandFailed, HostKeyMismatch, HostKeyUnknown, HostUnreachable, Result
from drivers.vmm.kvm import Versions, version_text
from scheduler.api.context import Context
from scheduler.config import parse_config
from scheduler.engine.clock import ManualClock
from scheduler.errors import DriverError
from scheduler.hosts.monitor import (
    MONITOR_KEYS,
    TOOLS,
    DiskSpace,
    HostMonitor,
    Probe,
    change_message,
    explain,
    parse_df,
    parse_tools,
    record_failure,
    record_success,
    tool_key,
    tools_argv,
)
from scheduler.model.objects.host import Host
from scheduler.model.objects.states import HostState
from scheduler.model.template import Template
from scheduler.store.codecs import build_codecs
from scheduler.store.sqlite import Store
from scheduler.store.state import State

DF_HEADER = "Filesystem     1048576-blocks   Used Available Capacity Mounted on\n"


@pytest.mark.parametrize(
    ("stdout", "expected"),
    [
        (DF_HEADER + "/dev/sda1            101552  40211     56102      42% /\n", DiskSpace(101552, 56102)),
        (DF_HEADER + "overlay 20 0 20 0% /var/tmp/vmsched\n", DiskSpace(20, 20)),
        (DF_HEADER + "my disk (usb)  500 100 400 20% /mnt/with space\n", DiskSpace(500, 400)),
        (DF_HEADER + "tmpfs 0 0 0 - /run/x\n", DiskSpace(0, 0)),
        ("\n" + DF_HEADER + "/dev/vda 7 1 6 15% /\n\n", DiskSpace(7, 6)),
    ],
)
def test_parse_df(stdout: str, expected: DiskSpace) -> None:
    assert parse_df(stdout) == expected


@pytest.mark.parametrize(
    "stdout",
    ["", DF_HEADER, DF_HEADER + "/dev/sda1 12M 3M 9M 25% /\n", "df: /nope: No such file or directory\n"],
)
def test_parse_df_refuses_what_it_cannot_read(stdout: str) -> None:
    with pytest.raises(DriverError, match="unexpected df output"):
        parse_df(stdout)


@pytest.mark.parametrize(
    ("stdout", "expected"),
    [
        ("", frozenset()),
        ("qemu-img\nrsync\n", frozenset({"qemu-img", "rsync"})),
        ("qemu-img\r\nrestic\n  qemu-nbd  \nrbd\n", frozenset({"qemu-img", "restic", "qemu-nbd", "rbd"})),
        ("/usr/bin/rsync\nsomething-else\nrsync: motd\n", frozenset()),  # only bare known names count
    ],
)
def test_parse_tools(stdout: str, expected: frozenset[str]) -> None:
    assert parse_tools(stdout) == expected


def test_tools_probe_keeps_tool_names_out_of_the_shell_text() -> None:
    argv = tools_argv()
    assert argv[:2] == ["sh", "-c"] and argv[3] == "sh" and tuple(argv[4:]) == TOOLS
    assert not any(tool in argv[2] for tool in TOOLS)


@pytest.mark.parametrize(
    ("tool", "key"),
    [("qemu-img", "TOOL_QEMU_IMG"), ("rsync", "TOOL_RSYNC"), ("restic", "TOOL_RESTIC"), ("rbd", "TOOL_RBD"),
     ("qemu-nbd", "TOOL_QEMU_NBD")],
)
def test_tool_keys(tool: str, key: str) -> None:
    assert tool_key(tool) == key and key in MONITOR_KEYS


@pytest.mark.parametrize(("number", "text"), [(9000000, "9.0.0"), (7002005, "7.2.5"), (10010001, "10.10.1"), (0, "0.0.0")])
def test_version_text(number: int, text: str) -> None:
    assert version_text(number) == text


PROBE = Probe("9.0.0", "7.2.0", DiskSpace(total_mb=1000, free_mb=250), frozenset({"qemu-img", "rsync"}))


def host_in(state: HostState, **template: str) -> Host:
    tmpl = Template()
    for key, value in {"SSH_HOST": "10.0.0.5", **template}.items():
        tmpl.add(key, value)
    return Host(id=3, name="kvm3", state=state, prev_state=HostState.INIT, template=tmpl, monitored_at=50)


@pytest.mark.parametrize("before", [HostState.INIT, HostState.ERROR, HostState.MONITORED])
def test_record_success(before: HostState) -> None:
    host = host_in(before, ERROR="was down", FREE_MB="1")
    new = record_success(host, PROBE, 1000)
    assert new.state == HostState.MONITORED and new.monitored_at == 1000
    assert new.prev_state == (before if before != HostState.MONITORED else HostState.INIT)
    t = new.template
    assert (t.get("LIBVIRT_VERSION"), t.get("QEMU_VERSION"), t.get("FREE_MB"), t.get("TOTAL_MB")) == \
        ("9.0.0", "7.2.0", "250", "1000")
    assert [t.get(tool_key(tool)) for tool in TOOLS] == ["YES", "YES", "NO", "NO", "NO"]
    assert t.get("MONITOR_TIME") == "1000" and "ERROR" not in t and t.get("SSH_HOST") == "10.0.0.5"
    assert host.state == before and host.template.get("ERROR") == "was down"  # the original is untouched


@pytest.mark.parametrize(
    ("before", "reason", "error"),
    [
        (HostState.MONITORED, "kvm3: cannot connect: refused", "kvm3: cannot connect: refused"),
        (HostState.INIT, "line one\n  line two\t", "line one line two"),  # one line in TEMPLATE/ERROR
        (HostState.ERROR, "", "monitoring failed"),
    ],
)
def test_record_failure(before: HostState, reason: str, error: str) -> None:
    host = record_success(host_in(HostState.MONITORED), PROBE, 900) if before == HostState.MONITORED \
        else host_in(before)
    new = record_failure(host, reason, 1000)
    assert (new.state, new.template.get("ERROR"), new.template.get("MONITOR_TIME")) == (HostState.ERROR, error, "1000")
    assert new.monitored_at == host.monitored_at  # the last success stays the last success
    assert new.template.get("FREE_MB") == host.template.get("FREE_MB")  # last values kept
    assert "ERROR" not in host.template


def test_change_messages_are_given_once() -> None:
    fresh = host_in(HostState.INIT)
    up = record_success(fresh, PROBE, 1)
    down = record_failure(up, "refused", 2)
    assert change_message(fresh, up) == "host kvm3: MONITORED (libvirt 9.0.0, QEMU 7.2.0, 250 MiB free)"
    assert change_message(up, record_success(up, PROBE, 2)) is None
    assert change_message(up, down) == "host kvm3: ERROR: refused"
    assert change_message(down, record_failure(down, "refused", 3)) is None
    assert change_message(down, record_failure(down, "timed out", 3)) is None  # still down: TEMPLATE/ERROR says why
    assert change_message(down, record_success(down, PROBE, 4)) == "host kvm3: recovered, MONITORED"


def test_explain_a_changed_key_names_both_keys_and_the_way_out(tmp_path: Path) -> None:
    recorded, presented = asyncssh.generate_private_key("ssh-ed25519"), asyncssh.generate_private_key("ssh-ed25519")
    known_hosts = tmp_path / "known_hosts"
    hostkeys.accept_host_key(known_hosts, "10.0.0.5", 2222, recorded)
    host = host_in(HostState.MONITORED, SSH_PORT="2222")
    text = explain(HostKeyMismatch(f"HOST KEY CHANGED: {hostkeys.describe(presented)}"), host, known_hosts)
    assert hostkeys.fingerprint(presented) in text and hostkeys.fingerprint(recorded) in text
    assert f"ssh-keygen -R '[10.0.0.5]:2222' -f {known_hosts}" in text and "accept-hostkey" in text
    assert explain(HostKeyUnknown("not known SHA256:x; accept it with --accept-hostkey"), host, known_hosts) == \
        "not known SHA256:x; accept it with --accept-hostkey"


# -- the monitor over a real state, with host faults injected ---------------------------------------


@dataclass
class FakeHost:
    """What the injected links answer for one address: a fault, a gate to hold the probe, counters."""

    fault: Exception | None = None
    gate: asyncio.Event | None = None
    probes: int = 0
    probed: asyncio.Event = field(default_factory=asyncio.Event)
    commands: list[list[str]] = field(default_factory=list)


class FakeRunner:
    def __init__(self, host: FakeHost) -> None:
        self.host = host

    async def run(self, argv: Sequence[str], *, timeout: float, **_: Any) -> Result:  # noqa: ASYNC109
        self.host.commands.append(list(argv))
        if argv[0] == "sh":
            self.host.probes += 1
            self.host.probed.set()
            if self.host.gate is not None:
                await self.host.gate.wait()
            if self.host.fault is not None:
                raise self.host.fault
            return Result(0, b"qemu-img\nrsync\n", b"", 0.0)
        if argv[0] == "df":
            return Result(0, (DF_HEADER + "/dev/x 2000 500 1500 25% /\n").encode(), b"", 0.0)
        return Result(0, b"", b"", 0.0)


class FakeVmm:
    async def versions(self) -> Versions:
        return Versions("9.0.0", "7.2.0")

    async def poll_states(self) -> dict:
        return {}

    async def watch_states(self, callback: Any) -> None:
        self.callback = callback


class FakeLinks:
    def __init__(self, known_hosts: Path) -> None:
        self.hosts: dict[str, FakeHost] = {}
        self.settings = type("Settings", (), {"known_hosts": known_hosts})()
        self.forgotten: list[int] = []

    def at(self, address: str) -> FakeHost:
        return self.hosts.setdefault(address, FakeHost())

    def runner(self, host: Host) -> FakeRunner:
        return FakeRunner(self.at(host.template.get("SSH_HOST") or "local"))

    def vmm(self, host: Host) -> FakeVmm:
        return FakeVmm()

    def forget(self, host_id: int) -> None:
        self.forgotten.append(host_id)


@pytest.fixture
async def ctx(tmp_path: Path) -> AsyncIterator[Context]:
    state = State(await Store.open(tmp_path / "vmsched.db"), build_codecs())
    await state.load()
    config = parse_config(f'MONITORING_INTERVAL_HOST = "3600"\nBACKUP_BASE_PATH = "{tmp_path}/staging"\n')
    context = Context(state=state, config=config, clock=ManualClock(1_800_000_000), state_dir=tmp_path,
                      links=FakeLinks(tmp_path / "known_hosts"))
    yield context
    await state.close()
    await state.store.close()


async def put_host(ctx: Context, host: Host) -> None:
    async with ctx.state.mutation() as m:
        m.put("host", host)


async def until(check: Callable[[], bool], changed: asyncio.Event, timeout: float = 5) -> None:  # noqa: ASYNC109
    """Wait (with a deadline) for ``check()`` to hold, looking again each time ``changed`` is set."""
    async with asyncio.timeout(timeout):
        while not check():
            changed.clear()
            await changed.wait()


async def wait_for(ctx: Context, host_id: int, wanted: HostState) -> Host:
    changed = asyncio.Event()
    listener = lambda kind, obj_id, obj: changed.set()  # noqa: E731
    ctx.state.listeners.append(listener)
    try:
        await until(lambda: ctx.state.get("host", host_id).state == wanted, changed)
    finally:
        ctx.state.listeners.remove(listener)
    return ctx.state.get("host", host_id)


async def running_monitor(ctx: Context) -> tuple[HostMonitor, asyncio.Task[None]]:
    monitor = HostMonitor(ctx, deadline=2)
    return monitor, asyncio.create_task(monitor.run())


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def new_host(host_id: int, address: str, state: HostState = HostState.INIT) -> Host:
    template = Template()
    template.add("SSH_HOST", address)
    return Host(id=host_id, name=f"kvm{host_id}", state=state, template=template)


async def test_hosts_are_monitored_at_start_and_on_change_without_waiting_a_round(ctx: Context) -> None:
    await put_host(ctx, new_host(0, "10.0.0.1"))
    await put_host(ctx, new_host(1, "10.0.0.2", HostState.DISABLED))
    monitor, task = await running_monitor(ctx)
    try:
        host = await wait_for(ctx, 0, HostState.MONITORED)
        assert host.template.get("FREE_MB") == "1500" and host.template.get("TOOL_RSYNC") == "YES"
        assert host.monitored_at == 1_800_000_000
        links = ctx.links
        assert ["mkdir", "-p", "--", str(ctx.config.backup_base_path)] in links.at("10.0.0.1").commands
        assert links.at("10.0.0.2").probes == 0  # DISABLED: left alone

        await put_host(ctx, Host(id=2, name="kvm2"))  # allocated, empty: its settings follow
        await monitor.settled()
        assert links.at("local").probes == 0
        await put_host(ctx, new_host(2, "10.0.0.3"))  # updated: probed at once, the interval is an hour
        await wait_for(ctx, 2, HostState.MONITORED)
        await monitor.settled()
        assert links.at("10.0.0.1").probes == 1 and links.at("10.0.0.3").probes == 1  # own writes poke nothing
    finally:
        await stop(task)


async def test_an_unreachable_host_goes_to_error_and_back(ctx: Context, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="scheduler.hosts.monitor")
    await put_host(ctx, new_host(0, "10.0.0.1"))
    monitor, task = await running_monitor(ctx)
    fake = ctx.links.at("10.0.0.1")
    try:
        await wait_for(ctx, 0, HostState.MONITORED)
        fake.fault = HostUnreachable("root@10.0.0.1: cannot connect: Connection refused")
        monitor.monitor_all()
        host = await wait_for(ctx, 0, HostState.ERROR)
        assert host.template.get("ERROR") == "root@10.0.0.1: cannot connect: Connection refused"
        assert host.prev_state == HostState.MONITORED
        monitor.monitor_all()
        await monitor.settled()
        fake.fault = None
        monitor.monitor_all()
        host = await wait_for(ctx, 0, HostState.MONITORED)
        assert "ERROR" not in host.template
        await monitor.settled()
    finally:
        await stop(task)
    errors = [r.getMessage() for r in caplog.records if "ERROR: root@10.0.0.1" in r.getMessage()]
    assert len(errors) == 1  # logged once, not every round
    assert any(r.getMessage() == "host kvm0: recovered, MONITORED" for r in caplog.records)


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        (CommandFailed(["sh"], 127, b"sh: not found"), "exited with status 127: sh: not found"),
        (RuntimeError("bug"), "monitoring failed: RuntimeError('bug')"),
    ],
)
async def test_probe_failures_are_recorded_not_raised(ctx: Context, fault: Exception, error: str) -> None:
    await put_host(ctx, new_host(0, "10.0.0.1"))
    ctx.links.at("10.0.0.1").fault = fault
    monitor, task = await running_monitor(ctx)
    try:
        host = await wait_for(ctx, 0, HostState.ERROR)
        assert error in (host.template.get("ERROR") or "")
    finally:
        await stop(task)


async def test_a_probe_past_its_deadline_is_an_error(ctx: Context) -> None:
    await put_host(ctx, new_host(0, "10.0.0.1"))
    ctx.links.at("10.0.0.1").gate = asyncio.Event()  # never set: the host never answers
    monitor = HostMonitor(ctx, deadline=0.1)
    task = asyncio.create_task(monitor.run())
    try:
        host = await wait_for(ctx, 0, HostState.ERROR)
        assert host.template.get("ERROR") == "no answer to monitoring within 0.1 s"
    finally:
        await stop(task)


async def test_a_probe_made_with_old_settings_is_dropped(ctx: Context) -> None:
    await put_host(ctx, new_host(0, "10.0.0.1"))
    old = ctx.links.at("10.0.0.1")
    old.gate, old.fault = asyncio.Event(), HostUnreachable("old address is gone")
    monitor, task = await running_monitor(ctx)
    try:
        await until(lambda: old.probes > 0, old.probed)
        await put_host(ctx, new_host(0, "10.0.0.9"))  # moved while the old probe is still out
        old.gate.set()
        host = await wait_for(ctx, 0, HostState.MONITORED)
        assert "ERROR" not in host.template and host.template.get("SSH_HOST") == "10.0.0.9"
    finally:
        await stop(task)


async def test_disabled_and_deleted_hosts(ctx: Context) -> None:
    await put_host(ctx, new_host(0, "10.0.0.1"))
    monitor, task = await running_monitor(ctx)
    try:
        await wait_for(ctx, 0, HostState.MONITORED)
        disabled = new_host(0, "10.0.0.1", HostState.DISABLED)
        await put_host(ctx, disabled)
        monitor.monitor_all()
        await monitor.settled()
        assert ctx.state.get("host", 0).state == HostState.DISABLED  # never overwritten by the monitor
        assert ctx.links.at("10.0.0.1").probes == 1
        async with ctx.state.mutation() as m:
            m.delete("host", 0)
        assert ctx.links.forgotten == [0]
    finally:
        await stop(task)


async def test_a_reload_applies_the_new_interval(ctx: Context) -> None:
    await put_host(ctx, new_host(0, "10.0.0.1"))
    monitor, task = await running_monitor(ctx)
    fake = ctx.links.at("10.0.0.1")
    try:
        await wait_for(ctx, 0, HostState.MONITORED)
        ctx.config = parse_config('MONITORING_INTERVAL_HOST = "1"\n')
        monitor.reconfigure()
        await until(lambda: fake.probes >= 2, fake.probed)
    finally:
        await stop(task)
