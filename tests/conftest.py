"""Shared fixtures: a real `vmsched serve` daemon on a free port, with its own state directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytest_plugins = ["tests.realenv.plugin"] if (REPO / "tests/realenv/plugin.py").exists() else []

# Per-test timeouts (pytest-timeout): a unit test that hangs fails in UNIT_TIMEOUT seconds; tests marked
# ``realenv`` or ``slow`` keep the longer ``timeout`` of pyproject.toml (VMs, hosts, daemons on a 2-core machine).
UNIT_TIMEOUT = 30


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if not any(item.get_closest_marker(name) for name in ("timeout", "realenv", "slow")):
            item.add_marker(pytest.mark.timeout(UNIT_TIMEOUT))


@dataclass
class Daemon:
    state_dir: Path
    process: subprocess.Popen[str]
    endpoint: str
    auth_file: Path
    env: dict[str, str] = field(default_factory=dict)
    log_file: Path | None = None

    @property
    def session(self) -> str:
        return self.auth_file.read_text().strip()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(timeout=timeout)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return code

    def log(self) -> str:
        return self.log_file.read_text() if self.log_file and self.log_file.exists() else ""


def start_daemon(state_dir: Path, config_text: str = "", home: Path | None = None, timeout: float = 30,
                 extra_env: dict[str, str] | None = None) -> Daemon:
    """Start `vmsched serve` on a free port and wait for its "listening on" line (after start-up recovery).
    ``extra_env``: variables for the daemon only (test switches such as VMSCHED_CRASH_AT)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    conf = state_dir / "sched.conf"
    if not conf.exists():
        listen = "" if "LISTEN" in config_text else 'LISTEN = [ ADDRESS = "127.0.0.1", PORT = "0" ]\n'
        conf.write_text(listen + config_text)
    log_file = state_dir / "daemon.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with log_file.open("a") as log:  # the daemon has its own descriptor once started
        process = subprocess.Popen(
            [sys.executable, "-m", "scheduler", "serve", "--state-dir", str(state_dir)],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env={**env, **(extra_env or {})},
            cwd=REPO,
        )
    endpoint = _wait_for_listening(process, log_file, timeout)
    auth_file = state_dir / "one_auth"
    home = home or state_dir / "home"
    home.mkdir(exist_ok=True)
    client_env = dict(env, VMSCHED_ENDPOINT=endpoint, VMSCHED_AUTH=str(auth_file), HOME=str(home))
    client_env.pop("ONE_AUTH", None)
    client_env.pop("ONE_XMLRPC", None)
    return Daemon(state_dir, process, endpoint, auth_file, client_env, log_file)


def _wait_for_listening(process: subprocess.Popen[str], log_file: Path, timeout: float) -> str:
    import selectors

    assert process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not selector.select(timeout=max(0.0, deadline - time.monotonic())):
            break
        line = process.stdout.readline()
        if not line:
            break
        if line.startswith("listening on "):
            return line.split()[-1].strip()
    process.kill()
    process.wait()
    process.stdout.close()
    raise RuntimeError(f"vmsched serve did not start; its log:\n{log_file.read_text() if log_file.exists() else ''}")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    running = start_daemon(tmp_path / "state")
    try:
        yield running
    finally:
        code = running.stop()
        assert code == 0, f"daemon exited with {code}; log:\n{running.log()}"
        assert "Traceback" not in running.log(), running.log()


@pytest.fixture
def one(daemon: Daemon):
    """A pyone client logged in as oneadmin."""
    import pyone

    return pyone.OneServer(daemon.endpoint, session=daemon.session, timeout=30)
