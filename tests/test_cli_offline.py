"""The vmsched command without a daemon: local files, arguments, endpoint and credentials, output helpers."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from lxml import etree

from scheduler.cli import main
from scheduler.cli.client import DEFAULT_ENDPOINT, UsageError, auth_file, read_session, resolve_endpoint
from scheduler.cli.hosts import parse_ssh_target
from scheduler.cli.states import lcm_short, vm_stat
from scheduler.cli.tables import Column, format_mb, render_table, to_json

REPO = Path(__file__).resolve().parents[1]

MESSY = """# a comment
name = "web 1"   # trailing comment
disk = [ size = 1024, image_id = 3 ]
Memory=512
disk=[TARGET="vdb"]
"""

NORMALISED = """DISK=[
  IMAGE_ID="3",
  SIZE="1024" ]
DISK=[
  TARGET="vdb" ]
MEMORY="512"
NAME="web 1"
"""


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No test sees the real home directory or the caller's vmsched/OpenNebula settings."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("VMSCHED_ENDPOINT", "ONE_XMLRPC", "VMSCHED_AUTH", "ONE_AUTH"):
        monkeypatch.delenv(name, raising=False)
    return home


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- template format ------------------------------------------------------------------------------


def test_template_format_prints_the_normalised_text(tmp_path, capsys):
    path = tmp_path / "vm.tmpl"
    path.write_text(MESSY)
    assert run(["template", "format", str(path)], capsys) == (0, NORMALISED, "")


def test_template_format_reads_standard_input(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(MESSY))
    assert run(["template", "format", "-"], capsys) == (0, NORMALISED, "")


@pytest.mark.parametrize("placement", ["after", "before"])
def test_template_format_xml(tmp_path, capsys, placement):
    path = tmp_path / "vm.tmpl"
    path.write_text(MESSY)
    argv = (
        ["template", "format", str(path), "--xml"]
        if placement == "after"
        else ["--xml", "template", "format", str(path)]
    )
    code, out, _ = run(argv, capsys)
    assert code == 0
    root = etree.fromstring(out.encode())
    assert root.tag == "TEMPLATE"
    assert [d.findtext("SIZE") for d in root.findall("DISK")] == ["1024", None]
    assert root.findtext("NAME") == "web 1"
    assert "\n  <MEMORY>512</MEMORY>\n" in out  # pretty-printed


def test_template_format_json(tmp_path, capsys):
    path = tmp_path / "vm.tmpl"
    path.write_text(MESSY)
    code, out, _ = run(["--json", "template", "format", str(path)], capsys)
    assert code == 0
    assert json.loads(out)["TEMPLATE"]["DISK"] == [{"IMAGE_ID": "3", "SIZE": "1024"}, {"TARGET": "vdb"}]


@pytest.mark.parametrize(
    ("text", "where", "message"),
    [
        ('A = "x"\nB = [ C = 1\n', ":3:1:", "vector B is not closed with ']'"),
        ('A = "unterminated\n', ":1:5:", "unterminated quoted value"),
        ("= 3\n", ":1:1:", "expected an attribute name"),
    ],
)
def test_template_format_syntax_error_exits_2_with_file_line_col(tmp_path, capsys, text, where, message):
    path = tmp_path / "bad.tmpl"
    path.write_text(text)
    code, out, err = run(["template", "format", str(path)], capsys)
    assert (code, out) == (2, "")
    assert err.startswith(f"{path}{where} ")
    assert message in err
    assert "Traceback" not in err


def test_template_format_syntax_error_on_stdin_names_stdin(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("A = [ B = 1\n"))
    code, _, err = run(["template", "format", "-"], capsys)
    assert code == 2
    assert err.startswith("<stdin>:2:1: ")


def test_template_format_missing_file_exits_2(tmp_path, capsys):
    code, out, err = run(["template", "format", str(tmp_path / "nope")], capsys)
    assert (code, out) == (2, "")
    assert f"cannot read {tmp_path / 'nope'}" in err


# -- config check ---------------------------------------------------------------------------------


def test_config_check_ok(tmp_path, capsys):
    path = tmp_path / "sched.conf"
    path.write_text('LISTEN = [ ADDRESS = "127.0.0.1", PORT = "2633" ]\nMAX_BACKUPS = 3\n')
    assert run(["config", "check", str(path)], capsys) == (0, f"{path}: OK\n", "")


def test_config_check_reports_every_problem_on_its_own_line(tmp_path, capsys):
    path = tmp_path / "sched.conf"
    path.write_text('MAX_BACKUPZ = 3\nMAX_BACKUPS = "many"\n')
    code, out, err = run(["config", "check", str(path)], capsys)
    assert (code, out) == (2, "")
    lines = err.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{path}:1: MAX_BACKUPZ") and "MAX_BACKUPS" in lines[0]
    assert lines[1].startswith(f"{path}:2: MAX_BACKUPS")


def test_config_check_missing_file_exits_2(tmp_path, capsys):
    code, _, err = run(["config", "check", str(tmp_path / "absent.conf")], capsys)
    assert code == 2
    assert "absent.conf" in err


# -- arguments ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], "required"),
        (["frobnicate"], "invalid choice"),
        (["host"], "required"),
        (["host", "create", "kvm1"], "--ssh"),
        (["vm", "rename", "3"], "required"),
        (["--json", "--xml", "vm", "list"], "not allowed with"),
        (["--timeout", "soon", "vm", "list"], "invalid number of seconds"),
        (["vm", "list", "--timeout", "0"], "must be more than 0 seconds"),
    ],
)
def test_argument_errors_exit_2_with_usage(capsys, argv, expected):
    code, out, err = run(argv, capsys)
    assert (code, out) == (2, "")
    assert "usage: vmsched" in err
    assert expected in err


@pytest.mark.parametrize(
    "argv",
    [
        ["user", "passwd", "bob"],  # neither an argument nor --stdin
        ["user", "passwd", "bob", "pw", "--stdin"],  # both
        ["host", "create", "kvm1", "--ssh", "root@"],
        ["host", "create", "kvm1", "--ssh", "kvm1:99999"],
    ],
)
def test_bad_values_exit_2_before_contacting_anyone(capsys, argv):
    # No credentials exist: reaching for them would be a different error.
    code, out, err = run(argv, capsys)
    assert (code, out) == (2, "")
    assert "credentials" not in err and err.strip()


def test_help_mentions_stdin_for_passwords(capsys):
    code, out, _ = run(["user", "passwd", "--help"], capsys)
    assert code == 0
    text = " ".join(out.split())  # argparse wraps help text
    assert "--stdin read the password from the first line of standard input" in text


def test_python_m_scheduler_is_the_vmsched_command():
    done = subprocess.run(
        [sys.executable, "-m", "scheduler", "--help"], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert done.returncode == 0
    assert done.stdout.startswith("usage: vmsched")
    for command in ("serve", "template", "config", "host", "datastore", "vm", "image", "user"):
        assert f"    {command} " in done.stdout


# -- endpoint and credentials ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "env", "expected"),
    [
        (None, {}, DEFAULT_ENDPOINT),
        (None, {"ONE_XMLRPC": "http://one:2633/RPC2"}, "http://one:2633/RPC2"),
        (None, {"ONE_XMLRPC": "http://one/RPC2", "VMSCHED_ENDPOINT": "http://v/RPC2"}, "http://v/RPC2"),
        ("https://o/RPC2", {"ONE_XMLRPC": "http://one/RPC2", "VMSCHED_ENDPOINT": "http://v/RPC2"}, "https://o/RPC2"),
        (None, {"VMSCHED_ENDPOINT": ""}, DEFAULT_ENDPOINT),
    ],
)
def test_endpoint_precedence(option, env, expected):
    assert resolve_endpoint(option, env) == expected


def test_endpoint_must_be_a_url():
    with pytest.raises(UsageError, match="http:// or https://"):
        resolve_endpoint("localhost:2633", {})


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "{home}/.one/one_auth"),
        ({"ONE_AUTH": "/etc/one_auth"}, "/etc/one_auth"),
        ({"ONE_AUTH": "/etc/one_auth", "VMSCHED_AUTH": "/etc/vmsched_auth"}, "/etc/vmsched_auth"),
    ],
)
def test_auth_file_precedence(tmp_path, env, expected):
    home = tmp_path / "somebody"
    assert auth_file({"HOME": str(home), **env}) == Path(expected.format(home=home))


@pytest.mark.parametrize(
    ("content", "session"),
    [
        ("oneadmin:secret\n", "oneadmin:secret"),
        ("\n  oneadmin:pa:ss:word  \n", "oneadmin:pa:ss:word"),
        ("bob:x", "bob:x"),
    ],
)
def test_read_session(tmp_path, content, session):
    path = tmp_path / "one_auth"
    path.write_text(content)
    assert read_session(path) == session


@pytest.mark.parametrize("content", ["", "\n\n", "oneadmin\n", ":secret\n"])
def test_read_session_rejects_malformed_files(tmp_path, content):
    path = tmp_path / "one_auth"
    path.write_text(content)
    with pytest.raises(UsageError, match="expected one line 'user:password'"):
        read_session(path)


def test_missing_credentials_file_is_named_and_exits_2(isolated_env, capsys, monkeypatch):
    monkeypatch.setenv("VMSCHED_ENDPOINT", "http://127.0.0.1:9/RPC2")
    code, out, err = run(["vm", "list"], capsys)
    assert (code, out) == (2, "")
    assert f"{isolated_env}/.one/one_auth does not exist" in err
    assert "VMSCHED_AUTH" in err


def test_credentials_come_from_home_when_no_variable_is_set(isolated_env, capsys, monkeypatch):
    (isolated_env / ".one").mkdir()
    (isolated_env / ".one" / "one_auth").write_text("oneadmin\n")  # malformed: proves this file was read
    monkeypatch.setenv("VMSCHED_ENDPOINT", "http://127.0.0.1:9/RPC2")
    code, _, err = run(["host", "list"], capsys)
    assert code == 2
    assert f"{isolated_env}/.one/one_auth: expected one line" in err


def test_unreachable_daemon_exits_1_without_traceback(tmp_path):
    auth = tmp_path / "auth"
    auth.write_text("oneadmin:pw\n")
    with socket.socket() as bound:  # bound but not listening: connections are refused
        bound.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{bound.getsockname()[1]}/RPC2"
        done = subprocess.run(
            [sys.executable, "-m", "scheduler", "host", "list"],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
            env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "VMSCHED_ENDPOINT": url, "VMSCHED_AUTH": str(auth)},
        )
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr.startswith(f"cannot reach vmsched at {url}: ")
    assert "refused" in done.stderr
    assert "Traceback" not in done.stderr


# -- pure helpers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("kvm1", (None, "kvm1", None)),
        ("10.0.0.5:2222", (None, "10.0.0.5", 2222)),
        ("root@kvm1.example.org", ("root", "kvm1.example.org", None)),
        ("backup@kvm1:22", ("backup", "kvm1", 22)),
        ("[fd00::5]:2200", (None, "fd00::5", 2200)),
        ("admin@[::1]", ("admin", "::1", None)),
    ],
)
def test_parse_ssh_target(target, expected):
    assert parse_ssh_target(target) == expected


@pytest.mark.parametrize("target", ["", "root@", "kvm1:", "kvm1:0", "kvm1:65536", "fd00::5", "a b", "kvm1:ssh"])
def test_parse_ssh_target_rejects(target):
    with pytest.raises(UsageError, match="--ssh"):
        parse_ssh_target(target)


@pytest.mark.parametrize(
    ("state", "lcm", "stat"),
    [
        ("3", "3", "runn"),
        ("3", "69", "back"),
        ("3", "70", "back"),
        ("3", "71", "rest"),
        ("3", "2", "boot"),
        ("3", "36", "fail"),
        ("3", "7", "save"),
        ("3", "8", "migr"),
        ("3", "35", "boot"),
        ("3", "24", "snap"),
        ("3", "17", "hotp"),
        ("3", "16", "unkn"),
        ("1", "0", "pend"),
        ("2", "0", "hold"),
        ("8", "0", "poff"),
        ("9", "0", "unde"),
        ("6", "0", "done"),
        ("42", "0", "42"),
        ("3", "99", "99"),
    ],
)
def test_vm_stat_column(state, lcm, stat):
    assert vm_stat(state, lcm) == stat


def test_every_failure_state_is_fail():
    assert lcm_short("PROLOG_MIGRATE_UNKNOWN_FAILURE") == "fail"


@pytest.mark.parametrize(
    ("mb", "text"),
    [("0", "0M"), ("512", "512M"), ("1024", "1G"), ("1536", "1.5G"), ("3145728", "3T"), ("", "-"), ("x", "x")],
)
def test_format_mb(mb, text):
    assert format_mb(mb) == text


def test_render_table_aligns_columns():
    items = [etree.fromstring(f"<I><ID>{i}</ID><NAME>{n}</NAME></I>") for i, n in ((3, "alpha"), (12, "b"))]
    columns = (Column("ID", lambda e: e.findtext("ID"), right=True), Column("NAME", lambda e: e.findtext("NAME")))
    assert render_table(columns, items) == "ID NAME\n 3 alpha\n12 b\n"


def test_to_json_makes_lists_of_repeated_and_declared_tags():
    pool = etree.fromstring("<P><VM><ID>1</ID><D>a</D><D>b</D><E/></VM></P>")
    assert to_json(pool, frozenset({"VM"})) == {"P": {"VM": [{"ID": "1", "D": ["a", "b"], "E": ""}]}}
    assert to_json(pool) == {"P": {"VM": {"ID": "1", "D": ["a", "b"], "E": ""}}}
