"""Users never see a library's Python warnings (scheduler/entry.py); VMSCHED_DEBUG=1 or --debug shows them.

Run as a user would: the installed ``vmsched`` script in a subprocess, with a clean environment.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from scheduler.entry import apply_warning_policy, debug_requested
from tests.conftest import start_daemon

REPO = Path(__file__).resolve().parents[1]
VMSCHED = Path(sys.prefix) / "bin" / "vmsched"


def vmsched(argv: list[str], home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VMSCHED), *argv], capture_output=True, text=True, timeout=60, cwd=home,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(home), **env})


def library_warnings() -> list[str]:
    """What the CLI's imports warn about when Python shows everything (empty once the libraries stop)."""
    done = subprocess.run([sys.executable, "-W", "default", "-c", "import scheduler.cli, scheduler.daemon.service"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    return [line for line in done.stderr.splitlines() if "Warning: " in line]


def test_help_prints_no_warning(tmp_path: Path) -> None:
    done = vmsched(["--help"], tmp_path)
    assert done.returncode == 0 and "usage: vmsched" in done.stdout
    assert "Warning" not in done.stdout + done.stderr
    assert done.stderr == ""


def test_a_failing_command_prints_its_error_and_no_warning(tmp_path: Path) -> None:
    auth = tmp_path / "auth"
    auth.write_text("oneadmin:pw\n")
    with socket.socket() as bound:  # bound but not listening: connections are refused
        bound.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{bound.getsockname()[1]}/RPC2"
        done = vmsched(["vm", "list"], tmp_path, VMSCHED_ENDPOINT=url, VMSCHED_AUTH=str(auth))
    assert done.returncode == 1
    assert done.stderr.startswith(f"cannot reach vmsched at {url}: ")
    assert "Warning" not in done.stderr and len(done.stderr.splitlines()) == 1


def test_bad_arguments_print_the_usage_and_no_warning(tmp_path: Path) -> None:
    done = vmsched(["vm", "show"], tmp_path)
    assert done.returncode == 2 and "usage:" in done.stderr
    assert "Warning" not in done.stderr


@pytest.mark.parametrize("how", [{"VMSCHED_DEBUG": "1"}, "--debug"])
def test_debug_shows_the_library_warnings(tmp_path: Path, how: dict[str, str] | str) -> None:
    argv, env = (["--help"], how) if isinstance(how, dict) else ([how, "--help"], {})
    done = vmsched(argv, tmp_path, **env)
    assert done.returncode == 0
    shown = [line for line in done.stderr.splitlines() if "Warning: " in line]
    assert shown == library_warnings()


def test_the_daemons_log_starts_without_warnings(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path / "state", 'LOG = [ SYSTEM = "stderr", DEBUG_LEVEL = "2" ]\n')
    try:
        first_lines = daemon.log().splitlines()
    finally:
        assert daemon.stop() == 0
    assert first_lines, "the daemon logged nothing before listening"
    assert not [line for line in first_lines if "Warning" in line]


def test_without_debug_a_warning_goes_to_the_log_at_debug(caplog: pytest.LogCaptureFixture,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    with warnings.catch_warnings():  # restores showwarning and the filters afterwards
        warnings.simplefilter("always")
        apply_warning_policy(debug=False)
        with caplog.at_level(logging.DEBUG, logger="py.warnings"):
            warnings.warn("old API", DeprecationWarning, stacklevel=1)
    assert capsys.readouterr().err == ""
    [record] = [r for r in caplog.records if r.name == "py.warnings"]
    assert record.levelno == logging.DEBUG
    assert "DeprecationWarning: old API" in record.getMessage()


def test_debug_is_asked_by_the_flag_or_the_environment() -> None:
    assert debug_requested(["vm", "list", "--debug"], {})
    assert debug_requested([], {"VMSCHED_DEBUG": "1"})
    assert debug_requested([], {"VMSCHED_DEBUG": "yes"})
    assert not debug_requested([], {"VMSCHED_DEBUG": "0"})
    assert not debug_requested(["vm", "list"], {})
