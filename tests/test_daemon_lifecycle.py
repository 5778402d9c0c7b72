"""`vmsched serve` as systemd runs it: sd_notify, SIGTERM drain, SIGHUP reload, kill -9 and restart, /metrics.

Real daemons (tests/conftest.py start_daemon) with VMSCHED_SIMULATE_ACTIONS, so a backup only waits
and succeeds; everything else (API, engine, journal, store) is the production code.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyone
import pytest

from tests.conftest import Daemon, start_daemon

BACKUP_DS = 'NAME = "backups"\nTYPE = "BACKUP_DS"\nDS_MAD = "restic"\nRESTIC_PASSWORD = "pw"\n'


# -- helpers -----------------------------------------------------------------------------------------


@contextmanager
def environment(**values: str) -> Iterator[None]:
    """Extra environment variables for a daemon started inside the block (start_daemon copies os.environ)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


# While actions are simulated the daemon does not monitor hosts (they are not real); the long interval
# keeps these tests independent of that rule all the same.
QUIET_MONITOR = "MONITORING_INTERVAL_HOST = 1d\n"


def serve(state_dir: Path, config: str = "", simulate: str = "backup=2", **env: str) -> Daemon:
    """A daemon whose actions named in ``simulate`` only wait (VMSCHED_SIMULATE_ACTIONS)."""
    with environment(VMSCHED_SIMULATE_ACTIONS=simulate, **env):
        return start_daemon(state_dir, QUIET_MONITOR + config)


def client(daemon: Daemon) -> pyone.OneServer:
    return pyone.OneServer(daemon.endpoint, session=daemon.session, timeout=10)


def wait_until(check: Callable[[], Any], within: float = 10.0, every: float = 0.05, what: str = "") -> Any:
    """Poll ``check`` until it returns something true; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        time.sleep(every)


def metrics(daemon: Daemon) -> dict[str, float]:
    """The /metrics page as {"name{labels}": value}."""
    url = daemon.endpoint.removesuffix("/RPC2") + "/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        assert reply.headers.get_content_type() == "text/plain"
        text = reply.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def setup_fleet(one: pyone.OneServer, vms: int, hosts: int, bind: bool = True) -> tuple[int, list[int], list[int]]:
    """A backup datastore, ``hosts`` hosts and ``vms`` VMs, deployed round-robin on them when ``bind``."""
    ds = one.datastore.allocate(BACKUP_DS, -1)
    host_ids = [one.host.allocate(f"kvm{h}", "kvm", "kvm", -1) for h in range(hosts)]
    vm_ids = []
    for n in range(vms):
        vm = one.vm.allocate(f'NAME = "vm{n}"\nMEMORY = 64\n', False)
        if bind:
            one.vm.deploy(vm, host_ids[n % hosts], False, -1, "")
        vm_ids.append(vm)
    return ds, host_ids, vm_ids


def schedule_backup(one: pyone.OneServer, vm: int, ds: int, when: int | None = None) -> int:
    when = int(time.time()) if when is None else when
    return one.vm.schedadd(vm, f'SCHED_ACTION = [ ACTION = "backup", ARGS = "{ds},0", TIME = "{when}" ]')


def runs(daemon: Daemon) -> list[dict[str, Any]]:
    """The run journal, read from the state file (WAL readers do not disturb the daemon)."""
    with sqlite3.connect(daemon.state_dir / "vmsched.db", timeout=5) as db:
        db.row_factory = sqlite3.Row
        rows = [dict(row) for row in db.execute("SELECT * FROM runs ORDER BY id")]
    db.close()
    return rows


def done_actions(daemon: Daemon) -> set[int]:
    return {row["action_id"] for row in runs(daemon) if row["state"] == "done"}


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    level = best = 0
    for _, delta in sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals]):
        level += delta
        best = max(best, level)
    return best


def stopped_cleanly(daemon: Daemon, within: float = 15) -> None:
    code = daemon.stop(signal.SIGTERM, timeout=within)
    assert code == 0, daemon.log()
    assert "Traceback" not in daemon.log(), daemon.log()


# -- sd_notify ---------------------------------------------------------------------------------------


class NotifySocket:
    """The NOTIFY_SOCKET end systemd would hold: a unix datagram socket collecting messages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[list[str]] = []

    def wait_for(self, line: str, within: float = 10.0) -> list[str]:
        """The first message (received from now on or earlier) holding ``line``."""
        deadline = time.monotonic() + within
        while True:
            for message in self.messages:
                if line in message:
                    return message
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {line} in {self.messages}")
            self.sock.settimeout(remaining)
            try:
                self.messages.append(self.sock.recv(4096).decode().split("\n"))
            except TimeoutError:
                pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    listener = NotifySocket(tmp_path / "notify.sock")
    yield listener
    listener.close()


def test_sd_notify_ready_status_watchdog_and_stopping(tmp_path: Path, notify_socket: NotifySocket) -> None:
    daemon = serve(tmp_path / "state", NOTIFY_SOCKET=str(notify_socket.path), WATCHDOG_USEC="200000")
    try:
        ready = notify_socket.wait_for("READY=1")
        assert "STATUS=0 running, 0 queued" in ready
        assert "WATCHDOG=1" in notify_socket.wait_for("WATCHDOG=1")  # every WATCHDOG_USEC / 2
        watchdogs = sum("WATCHDOG=1" in m for m in notify_socket.messages)
        one = client(daemon)
        ds, _, [vm] = setup_fleet(one, vms=1, hosts=1)
        schedule_backup(one, vm, ds)
        notify_socket.wait_for("STATUS=1 running, 0 queued")
        assert sum("WATCHDOG=1" in m for m in notify_socket.messages) > watchdogs
        daemon.process.send_signal(signal.SIGTERM)
        assert notify_socket.wait_for("STOPPING=1") == ["STOPPING=1", "STATUS=stopping"]
        assert daemon.process.wait(timeout=15) == 0
        # READY=1 came once, before STOPPING=1, after start-up recovery.
        order = [line for m in notify_socket.messages for line in m if line in ("READY=1", "STOPPING=1")]
        assert order == ["READY=1", "STOPPING=1"]
    finally:
        stopped_cleanly(daemon)


# -- SIGTERM drain -----------------------------------------------------------------------------------


def test_sigterm_lets_a_running_backup_finish_within_drain_time(tmp_path: Path) -> None:
    daemon = serve(tmp_path / "state", "DRAIN_TIME = 10\n", simulate="backup=2")
    one = client(daemon)
    ds, _, [vm] = setup_fleet(one, vms=1, hosts=1)
    action = schedule_backup(one, vm, ds)
    wait_until(lambda: metrics(daemon).get("vmsched_runs_running") == 1, what="the backup to start")
    began = time.monotonic()
    stopped_cleanly(daemon)
    assert time.monotonic() - began < 5
    [row] = runs(daemon)
    assert (row["action_id"], row["state"], row["attempt"], row["message"]) == (action, "done", 1, "simulated backup")


def test_sigterm_cancels_a_backup_longer_than_drain_time_and_it_runs_at_next_start(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    daemon = serve(state_dir, "DRAIN_TIME = 1\n", simulate="backup=60")
    one = client(daemon)
    ds, _, [vm] = setup_fleet(one, vms=1, hosts=1)
    action = schedule_backup(one, vm, ds)
    wait_until(lambda: metrics(daemon).get("vmsched_runs_running") == 1, what="the backup to start")
    began = time.monotonic()
    stopped_cleanly(daemon)
    assert time.monotonic() - began < 5
    [row] = runs(daemon)
    assert (row["state"], row["attempt"], row["message"]) == ("queued", 0, "stopped by a daemon shutdown")

    again = serve(state_dir, simulate="backup=0.2")
    try:
        wait_until(lambda: done_actions(again) == {action}, what="the backup to run again")
        [row] = runs(again)
        assert (row["state"], row["attempt"]) == ("done", 1)
        assert client(again).vm.info(vm).TEMPLATE["SCHED_ACTION"]["DONE"] != "-1"
    finally:
        stopped_cleanly(again)


# -- SIGHUP reload -----------------------------------------------------------------------------------


def sched_message(one: pyone.OneServer, vm: int) -> str | None:
    return one.vm.info(vm).USER_TEMPLATE.get("SCHED_MESSAGE")


def test_sighup_applies_a_new_limit_and_keeps_the_old_config_when_invalid(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    daemon = serve(state_dir, "MAX_BACKUPS = 1\nMAX_BACKUPS_HOST = 0\nDRAIN_TIME = 0\n", simulate="backup=60")
    try:
        one = client(daemon)
        ds, hosts, vms = setup_fleet(one, vms=3, hosts=3)
        for vm in vms:
            schedule_backup(one, vm, ds)
        wait_until(lambda: metrics(daemon).get("vmsched_runs_running") == 1, what="one backup running")
        page = metrics(daemon)
        assert (page["vmsched_runs_queued"], page['vmsched_backups_waiting{limit="global"}']) == (2, 2)
        waiting = [sched_message(one, vm) for vm in vms]
        assert sorted(waiting, key=str) == [None, "waiting: MAX_BACKUPS=1 reached", "waiting: MAX_BACKUPS=1 reached"]

        conf = state_dir / "sched.conf"
        original = conf.read_text()
        raised = original.replace("MAX_BACKUPS = 1", "MAX_BACKUPS = 3")
        conf.write_text(raised)
        daemon.process.send_signal(signal.SIGHUP)
        wait_until(lambda: metrics(daemon).get("vmsched_runs_running") == 3, what="the new limit to apply")
        assert [sched_message(one, vm) for vm in vms] == [None, None, None]
        assert "reloaded" in daemon.log() and "MAX_BACKUPS=3" in daemon.log()

        conf.write_text(raised + "MAX_BACKUP = 2\nMISSED_RUNS = sometimes\n")
        daemon.process.send_signal(signal.SIGHUP)
        wait_until(lambda: daemon.log().count("reload refused") >= 2, what="both errors in the log")
        refused = [line for line in daemon.log().splitlines() if "reload refused" in line]
        assert len(refused) == 2
        assert any("MAX_BACKUP" in line and "MAX_BACKUPS" in line for line in refused)  # the typo, with known keys
        assert any("MISSED_RUNS" in line and "sometimes" in line for line in refused)
        # Still serving, with the config it had.
        assert one.vm.info(vms[0]).ID == vms[0]
        vm = one.vm.allocate('NAME = "late"\nMEMORY = 64\n', False)
        one.vm.deploy(vm, hosts[0], False, -1, "")
        schedule_backup(one, vm, ds)
        wait_until(lambda: sched_message(one, vm) == "waiting: MAX_BACKUPS=3 reached", what="the 4th to wait")
        assert daemon.process.poll() is None
    finally:
        stopped_cleanly(daemon)


# -- kill -9 and restart -----------------------------------------------------------------------------


def test_kill_9_while_backups_run_then_every_occurrence_is_done_exactly_once(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    config = 'MAX_BACKUPS = 2\nMAX_BACKUPS_HOST = 0\nRETRY = [ MAX = "3", BACKOFF = "1" ]\nDRAIN_TIME = 0\n'
    daemon = serve(state_dir, config, simulate="backup=0.6")
    one = client(daemon)
    ds, _, vms = setup_fleet(one, vms=6, hosts=3)
    actions = {schedule_backup(one, vm, ds): vm for vm in vms}
    wait_until(lambda: done_actions(daemon) and metrics(daemon).get("vmsched_runs_running") == 2,
               what="some backups done and two running")
    assert daemon.stop(signal.SIGKILL, timeout=10) == -signal.SIGKILL
    before = runs(daemon)
    done_before = {row["action_id"] for row in before if row["state"] == "done"}
    assert sum(row["state"] == "running" for row in before) >= 1  # killed mid-backup
    assert len(done_before) < len(actions)

    again = serve(state_dir, simulate="backup=0.3")
    try:
        wait_until(lambda: done_actions(again) == set(actions), within=15, what="every backup done")
        rows = runs(again)
        per_occurrence = Counter((row["action_id"], row["scheduled"]) for row in rows if row["state"] == "done")
        assert set(per_occurrence.values()) == {1}
        assert len(per_occurrence) == len(actions)
        assert all(row["state"] == "done" for row in rows)
        interrupted = [row for row in rows if row["action_id"] not in done_before]
        assert any(row["attempt"] == 2 for row in interrupted)  # the killed ones were retried
        intervals = [(row["started_at"], row["finished_at"]) for row in rows]
        assert most_at_once(intervals) <= 2
        one = client(again)
        for action, vm in actions.items():
            [sa] = [one.vm.info(vm).TEMPLATE["SCHED_ACTION"]]
            assert sa["ID"] == str(action) and not sa["MESSAGE"] and sa["DONE"] != "-1"
        page = metrics(again)
        assert page["vmsched_runs_running"] == 0 and page["vmsched_runs_queued"] == 0
        assert page['vmsched_runs_started_total{action="backup"}'] == len(actions) - len(done_before)
        assert not any(name.startswith("vmsched_backups_running_host{") for name in page)
        assert not any(name.startswith("vmsched_backups_waiting{") for name in page)
    finally:
        stopped_cleanly(again)


# -- /metrics ----------------------------------------------------------------------------------------


def test_metrics_page_is_prometheus_text_with_the_engines_families(tmp_path: Path) -> None:
    daemon = serve(tmp_path / "state", "MAX_BACKUPS = 5\nMAX_BACKUPS_HOST = 1\nDRAIN_TIME = 0\n",
                   simulate="backup=60,reboot=0")
    try:
        one = client(daemon)
        ds, _, vms = setup_fleet(one, vms=3, hosts=2)  # vm0 and vm2 on kvm0, vm1 on kvm1
        for vm in vms:
            schedule_backup(one, vm, ds)
        # vm2's backup waits for kvm0; its reboot, an hour late, runs meanwhile and succeeds.
        one.vm.schedadd(vms[2], f'SCHED_ACTION = [ ACTION = "reboot", TIME = "{int(time.time()) - 3600}" ]')
        wait_until(lambda: metrics(daemon).get('vmsched_runs_started_total{action="reboot"}') == 1
                   and metrics(daemon).get("vmsched_runs_running") == 2, what="two backups and the reboot")
        url = daemon.endpoint.removesuffix("/RPC2") + "/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
        for family, kind in [("vmsched_runs_running", "gauge"), ("vmsched_runs_queued", "gauge"),
                             ("vmsched_backups_waiting", "gauge"), ("vmsched_backups_running_host", "gauge"),
                             ("vmsched_backups_running_datastore", "gauge"), ("vmsched_runs_started_total", "counter"),
                             ("vmsched_run_failures_total", "counter"), ("vmsched_runs_given_up_total", "counter"),
                             ("vmsched_last_success_timestamp_seconds", "gauge"),
                             ("vmsched_dispatch_lateness_seconds", "histogram")]:
            assert f"# HELP {family} " in text
            assert f"# TYPE {family} {kind}\n" in text
        page = metrics(daemon)
        assert page['vmsched_backups_running_host{host="kvm0"}'] == 1
        assert page['vmsched_backups_running_host{host="kvm1"}'] == 1
        assert page[f'vmsched_backups_running_datastore{{datastore="{ds}"}}'] == 2
        assert page['vmsched_backups_waiting{limit="host"}'] == 1
        assert sched_message(one, vms[2]) == "waiting: MAX_BACKUPS_HOST=1 reached on host kvm0"
        assert page["vmsched_runs_queued"] == 1
        assert page['vmsched_runs_started_total{action="backup"}'] == 2
        # (its value's precision: test_engine.py::test_metrics_keep_every_digit_of_timestamps_and_counters)
        assert [name for name in page if name.startswith("vmsched_last_success_timestamp_seconds")] == [
            f'vmsched_last_success_timestamp_seconds{{vm="{vms[2]}"}}']
        assert page["vmsched_dispatch_lateness_seconds_count"] == 3
        assert page['vmsched_dispatch_lateness_seconds_bucket{le="+Inf"}'] == 3
        assert page['vmsched_dispatch_lateness_seconds_bucket{le="3600.0"}'] == 2  # the reboot was later
        assert page["vmsched_dispatch_lateness_seconds_sum"] >= 3600
    finally:
        stopped_cleanly(daemon)


def test_bound_vms_backups_run_after_a_restart(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    daemon = serve(state_dir, "DRAIN_TIME = 0\n", simulate="backup=0.1")
    ds, _, [vm] = setup_fleet(client(daemon), vms=1, hosts=1)
    stopped_cleanly(daemon)
    again = serve(state_dir, simulate="backup=0.1")
    try:
        action = schedule_backup(client(again), vm, ds)
        wait_until(lambda: done_actions(again) == {action}, within=5, what="the bound VM's backup")
    finally:
        stopped_cleanly(again)
