"""The vmsched command against a real daemon (as a subprocess), and its client edge against a stub server."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from xmlrpc.server import SimpleXMLRPCRequestHandler, SimpleXMLRPCServer

import pytest
from lxml import etree

from scheduler.cli import main
from scheduler.cli.client import Client
from scheduler.errors import ActionError, AuthError, NotFound, PermissionDenied, VmschedError
from tests.conftest import Daemon

REPO = Path(__file__).resolve().parents[1]

VM_TEMPLATE = """NAME = "web"
MEMORY = 64
DISK = [ SOURCE = "/var/lib/vms/web.qcow2", FORMAT = "qcow2", TYPE = "FILE", TARGET = "vda" ]
BACKUP_CONFIG = [ KEEP_LAST = "3", MODE = "FULL" ]
OWNER_NOTE = "kept in USER_TEMPLATE"
"""


@dataclass
class Result:
    code: int
    out: str
    err: str

    def xml(self) -> etree._Element:
        return etree.fromstring(self.out.encode())


def vmsched(daemon: Daemon, *argv: str, stdin: str | None = None, env: dict[str, str] | None = None) -> Result:
    done = subprocess.run(
        [sys.executable, "-m", "scheduler", *argv],
        input=stdin,
        capture_output=True,
        text=True,
        env=env or daemon.env,
        cwd=REPO,
        timeout=60,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return Result(done.returncode, done.stdout, done.stderr)


def ok(daemon: Daemon, *argv: str, stdin: str | None = None) -> str:
    result = vmsched(daemon, *argv, stdin=stdin)
    assert result.code == 0, result.err
    return result.out


def created_id(out: str) -> int:
    assert out.startswith("ID: "), out
    return int(out.split()[1])


def table(out: str) -> list[list[str]]:
    """Rows (header first) of a table whose cells hold no spaces."""
    return [line.split() for line in out.splitlines()]


# -- against the real daemon ----------------------------------------------------------------------


def test_host_lifecycle(daemon: Daemon, tmp_path: Path) -> None:
    key = tmp_path / "id_ed25519"
    # Nothing listens on port 9: the host is probed at once and may already show its error.
    out = ok(daemon, "host", "create", "kvm1", "--ssh", "backup@127.0.0.1:9", "--key", str(key))
    host_id = created_id(out)

    listed = table(ok(daemon, "host", "list"))
    assert listed[0] == ["ID", "NAME", "SSH", "VMS", "STAT"]
    assert listed[1][:4] == [str(host_id), "kvm1", "backup@127.0.0.1:9", "0"] and listed[1][4] in ("init", "err")
    shown = ok(daemon, "host", "show", "kvm1")  # by name
    assert shown.startswith(f"HOST {host_id} INFORMATION\n")
    for line in (
        'SSH_HOST="127.0.0.1"',
        'SSH_PORT="9"',
        'SSH_USER="backup"',
        f'SSH_KEY="{key}"',
    ):
        assert line in shown.splitlines()

    update = tmp_path / "extra.tmpl"
    update.write_text('LIBVIRT_URI = "qemu+ssh://backup@127.0.0.1:9/system"\n')
    ok(daemon, "host", "update", str(host_id), str(update), "--append")
    host = vmsched(daemon, "--xml", "host", "show", str(host_id)).xml()
    assert host.findtext("TEMPLATE/LIBVIRT_URI") == "qemu+ssh://backup@127.0.0.1:9/system"
    assert host.findtext("TEMPLATE/SSH_HOST") == "127.0.0.1"  # merged, not replaced

    ok(daemon, "host", "disable", "kvm1")
    assert table(ok(daemon, "host", "list"))[1][-1] == "dsbl"
    ok(daemon, "host", "enable", "kvm1")
    assert table(ok(daemon, "host", "list"))[1][-1] != "dsbl"

    ok(daemon, "host", "update", "kvm1", "-", stdin='SSH_HOST = "127.0.0.9"\nSSH_PORT = "9"\n')  # replace
    host = vmsched(daemon, "host", "show", "kvm1", "--xml").xml()
    assert host.findtext("TEMPLATE/SSH_HOST") == "127.0.0.9"
    assert host.find("TEMPLATE/LIBVIRT_URI") is None

    ok(daemon, "host", "delete", "kvm1")
    assert table(ok(daemon, "host", "list")) == [["ID", "NAME", "SSH", "VMS", "STAT"]]
    gone = vmsched(daemon, "host", "show", str(host_id))
    assert (gone.code, gone.out) == (1, "")
    assert str(host_id) in gone.err


def test_datastore_lifecycle(daemon: Daemon, tmp_path: Path) -> None:
    template = tmp_path / "ds.tmpl"
    template.write_text('NAME = "backups"\nTYPE = "BACKUP_DS"\nDS_MAD = "fs"\n')
    ds_id = created_id(ok(daemon, "datastore", "create", str(template)))

    rows = table(ok(daemon, "datastore", "list"))
    assert rows[0] == ["ID", "NAME", "SIZE", "AVA", "IMAGES", "TYPE", "DS", "STAT"]
    assert [rows[1][i] for i in (0, 1, 5, 6)] == [str(ds_id), "backups", "bck", "fs"]

    shown = ok(daemon, "datastore", "show", "backups")
    assert shown.startswith(f"DATASTORE {ds_id} INFORMATION\n")
    assert "TYPE                : BACKUP" in shown.splitlines()

    ok(daemon, "datastore", "update", "backups", "-", "--append", stdin='NOTE = "offsite"\n')
    listed = json.loads(ok(daemon, "--json", "datastore", "list"))
    (ds,) = listed["DATASTORE_POOL"]["DATASTORE"]
    assert ds["TEMPLATE"]["NOTE"] == "offsite"
    assert ds["TEMPLATE"]["DS_MAD"] == "fs"

    ok(daemon, "datastore", "delete", str(ds_id))
    assert len(table(ok(daemon, "datastore", "list"))) == 1


def test_vm_lifecycle(daemon: Daemon, tmp_path: Path) -> None:
    host_id = created_id(ok(daemon, "host", "create", "kvm1", "--ssh", "127.0.0.1"))
    vm_id = created_id(ok(daemon, "vm", "create", "-", stdin=VM_TEMPLATE))

    assert table(ok(daemon, "vm", "list")) == [
        ["ID", "USER", "GROUP", "NAME", "STAT", "HOST"],
        [str(vm_id), "oneadmin", "oneadmin", "web", "pend", "-"],
    ]
    ok(daemon, "vm", "deploy", "web", "kvm1")
    assert table(ok(daemon, "vm", "list", "--all"))[1][4:] == ["runn", "kvm1"]
    host = vmsched(daemon, "--xml", "host", "show", str(host_id)).xml()
    assert host.findall("VMS/ID")[0].text == str(vm_id)

    ok(daemon, "vm", "rename", "web", "web-1")
    ok(daemon, "vm", "update", "web-1", "-", "--append", stdin='CONTACT = "ops@example.org"\n')
    ok(daemon, "vm", "updateconf", str(vm_id), "-", "--append", stdin='BACKUP_CONFIG = [ KEEP_LAST = "7" ]\n')

    shown = ok(daemon, "vm", "show", "web-1")
    sections = [
        line for line in shown.splitlines() if line and line == line.upper() and "=" not in line and ":" not in line
    ]
    assert sections == [
        f"VIRTUAL MACHINE {vm_id} INFORMATION",
        "BACKUP CONFIGURATION",
        "VM BACKUPS",
        "USER TEMPLATE",
        "VIRTUAL MACHINE TEMPLATE",
    ]
    lines = shown.splitlines()
    assert "NAME                : web-1" in lines
    assert "HOST                : kvm1" in lines
    assert 'KEEP_LAST="7"' in lines
    assert 'CONTACT="ops@example.org"' in lines
    assert 'OWNER_NOTE="kept in USER_TEMPLATE"' in lines
    assert "IMAGE IDS: -" in lines

    vm = json.loads(ok(daemon, "--json", "vm", "show", str(vm_id)))["VM"]
    assert (vm["NAME"], vm["STATE"], vm["LCM_STATE"]) == ("web-1", "3", "3")

    ok(daemon, "vm", "delete", "web-1")
    assert table(ok(daemon, "vm", "list", "--all")) == [["ID", "USER", "GROUP", "NAME", "STAT", "HOST"]]


def test_bad_template_file_is_refused_locally(daemon: Daemon, tmp_path: Path) -> None:
    bad = tmp_path / "vm.tmpl"
    bad.write_text('NAME = "web"\nDISK = [ SIZE = 1\n')
    result = vmsched(daemon, "vm", "create", str(bad))
    assert (result.code, result.out) == (2, "")
    assert result.err.startswith(f"{bad}:3:1: ")
    assert table(ok(daemon, "vm", "list", "--all")) == [["ID", "USER", "GROUP", "NAME", "STAT", "HOST"]]


def test_names_that_match_nothing_or_several(daemon: Daemon) -> None:
    missing = vmsched(daemon, "vm", "show", "nosuchvm")
    assert (missing.code, missing.err) == (1, "no VM named 'nosuchvm'\n")
    first = created_id(ok(daemon, "vm", "create", "-", stdin='NAME = "twin"\n'))
    second = created_id(ok(daemon, "vm", "create", "-", stdin='NAME = "twin"\n'))
    twins = vmsched(daemon, "vm", "show", "twin")
    assert twins.code == 1
    assert f"(ids {first}, {second}): use an id" in twins.err
    assert f"VIRTUAL MACHINE {second} INFORMATION" in ok(daemon, "vm", "show", str(second))


def test_users_and_passwords(daemon: Daemon, tmp_path: Path) -> None:
    user_id = created_id(ok(daemon, "user", "create", "bob", "--stdin", stdin="first-pw\n"))
    rows = table(ok(daemon, "user", "list"))
    assert rows[0] == ["ID", "NAME", "GROUP", "AUTH", "ENABLED"]
    assert [row[1] for row in rows[1:]] == ["oneadmin", "bob"]

    bob_auth = tmp_path / "bob_auth"
    bob_auth.write_text("bob:first-pw\n")
    as_bob = dict(daemon.env, VMSCHED_AUTH=str(bob_auth))
    whoami = vmsched(daemon, "user", "show", env=as_bob)
    assert whoami.code == 0, whoami.err
    assert whoami.out.startswith(f"USER {user_id} INFORMATION\n")
    assert "PASSWORD" not in ok(daemon, "user", "show", "bob")

    ok(daemon, "user", "passwd", "bob", "--stdin", stdin="second-pw\n")
    refused = vmsched(daemon, "user", "show", env=as_bob)
    assert (refused.code, refused.out) == (1, "")
    assert refused.err.strip()
    bob_auth.write_text("bob:second-pw\n")
    assert vmsched(daemon, "user", "show", env=as_bob).code == 0

    ok(daemon, "user", "passwd", str(user_id), "third-pw")
    bob_auth.write_text("bob:third-pw\n")
    assert vmsched(daemon, "--json", "user", "show", env=as_bob).code == 0


def test_images_list_and_missing_image(daemon: Daemon) -> None:
    assert table(ok(daemon, "image", "list", "--all")) == [
        ["ID", "USER", "GROUP", "NAME", "DATASTORE", "SIZE", "TYPE", "STAT"]
    ]
    assert json.loads(ok(daemon, "image", "list", "--json")) == {"IMAGE_POOL": {"IMAGE": []}}
    missing = vmsched(daemon, "image", "delete", "42")
    assert (missing.code, missing.out) == (1, "")
    assert "42" in missing.err


def test_wrong_password_exits_1(daemon: Daemon, tmp_path: Path) -> None:
    auth = tmp_path / "wrong"
    auth.write_text("oneadmin:not-the-password\n")
    result = vmsched(daemon, "host", "list", env=dict(daemon.env, VMSCHED_AUTH=str(auth)))
    assert (result.code, result.out) == (1, "")
    assert result.err.strip()


def test_endpoint_option_beats_the_environment(daemon: Daemon) -> None:
    env = dict(daemon.env, VMSCHED_ENDPOINT="http://127.0.0.1:9/RPC2")
    assert vmsched(daemon, "host", "list", env=env).code == 1
    result = vmsched(daemon, "--endpoint", daemon.endpoint, "host", "list", env=env)
    assert (result.code, result.out) == (0, "ID NAME SSH VMS STAT\n")


# -- the client edge against a stub server --------------------------------------------------------


@dataclass
class Stub:
    """An XML-RPC server answering each method from ``replies`` and recording every call."""

    endpoint: str
    replies: dict[str, list[object]] = field(default_factory=dict)
    calls: list[tuple[str, tuple[object, ...]]] = field(default_factory=list)

    def _dispatch(self, method: str, params: tuple[object, ...]) -> object:
        self.calls.append((method, params))
        return self.replies.get(method, [True, 0, 0])


class _QuietHandler(SimpleXMLRPCRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def stub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stub]:
    server = SimpleXMLRPCServer(("127.0.0.1", 0), requestHandler=_QuietHandler, allow_none=True, logRequests=False)
    state = Stub(f"http://127.0.0.1:{server.server_address[1]}/RPC2")
    server.register_instance(state)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    auth = tmp_path / "auth"
    auth.write_text("alice:pw\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("VMSCHED_ENDPOINT", state.endpoint)
    monkeypatch.setenv("VMSCHED_AUTH", str(auth))
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("code", "exception"),
    [
        (0x0100, AuthError),
        (0x0200, PermissionDenied),
        (0x0400, NotFound),
        (0x0800, ActionError),
        (0x2000, VmschedError),
    ],
)
def test_error_codes_become_typed_errors(stub: Stub, code: int, exception: type[Exception]) -> None:
    stub.replies["one.vm.info"] = [False, "[one.vm.info] refused", code]
    with pytest.raises(exception, match=r"^\[one\.vm\.info\] refused$"):
        Client(stub.endpoint, "alice:pw", timeout=5).call("one.vm.info", 3, False)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["vm", "deploy", "3", "7"], [("one.vm.deploy", ("alice:pw", 3, 7, False, -1))]),
        (["vm", "delete", "3"], [("one.vm.recover", ("alice:pw", 3, 3))]),
        (["vm", "create", "-", "--hold"], [("one.vm.allocate", ("alice:pw", 'NAME="x"\n', True))]),
        (["vm", "list"], [("one.vmpool.info", ("alice:pw", -1, -1, -1, -1))]),
        (["vm", "list", "--all"], [("one.vmpool.info", ("alice:pw", -2, -1, -1, -1))]),
        (["vm", "update", "3", "-"], [("one.vm.update", ("alice:pw", 3, 'NAME="x"\n', 0))]),
        (["vm", "updateconf", "3", "-", "--append"], [("one.vm.updateconf", ("alice:pw", 3, 'NAME="x"\n', 1))]),
        (["image", "delete", "5", "--force"], [("one.image.delete", ("alice:pw", 5, True))]),
        (["user", "show"], [("one.user.info", ("alice:pw", -1))]),
        (["user", "create", "bob", "pw"], [("one.user.allocate", ("alice:pw", "bob", "pw", "core", []))]),
        (["datastore", "create", "-"], [("one.datastore.allocate", ("alice:pw", 'NAME="x"\n', -1))]),
        (["host", "disable", "2"], [("one.host.status", ("alice:pw", 2, 1))]),
        (["host", "enable", "2"], [("one.host.status", ("alice:pw", 2, 0))]),
    ],
)
def test_calls_follow_opennebula_signatures(stub, capsys, monkeypatch, argv, expected) -> None:
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO('name = "x"\n'))
    stub.replies["one.vmpool.info"] = [True, "<VM_POOL/>", 0]
    stub.replies["one.user.info"] = [True, "<USER><ID>4</ID><NAME>alice</NAME></USER>", 0]
    assert main(argv) == 0, capsys.readouterr().err
    assert stub.calls == expected


def test_host_create_removes_the_host_when_its_template_is_refused(stub, capsys) -> None:
    stub.replies["one.host.allocate"] = [True, 9, 0]
    stub.replies["one.host.update"] = [False, "[one.host.update] bad SSH_PORT", 0x1000]
    assert main(["host", "create", "kvm9", "--ssh", "root@kvm9:2200"]) == 1
    assert capsys.readouterr().err == "[one.host.update] bad SSH_PORT\n"
    assert [name for name, _ in stub.calls] == ["one.host.allocate", "one.host.update", "one.host.delete"]
    assert stub.calls[0][1] == ("alice:pw", "kvm9", "kvm", "kvm", -1)
    assert stub.calls[1][1] == ("alice:pw", 9, 'SSH_HOST="kvm9"\nSSH_PORT="2200"\nSSH_USER="root"\n', 1)
    assert stub.calls[2][1] == ("alice:pw", 9)


def test_names_resolve_through_the_pool(stub, capsys) -> None:
    stub.replies["one.hostpool.info"] = [
        True,
        "<HOST_POOL><HOST><ID>4</ID><NAME>kvm1</NAME></HOST><HOST><ID>6</ID><NAME>kvm2</NAME></HOST></HOST_POOL>",
        0,
    ]
    stub.replies["one.vmpool.info"] = [True, "<VM_POOL><VM><ID>11</ID><NAME>web</NAME></VM></VM_POOL>", 0]
    assert main(["vm", "deploy", "web", "kvm2"]) == 0
    assert stub.calls[-1] == ("one.vm.deploy", ("alice:pw", 11, 6, False, -1))


def test_show_renders_scheduled_actions_and_backups(stub, capsys) -> None:
    stub.replies["one.vm.info"] = [
        True,
        "<VM><ID>5</ID><NAME>db</NAME><UNAME>alice</UNAME><GNAME>users</GNAME><STATE>3</STATE>"
        "<LCM_STATE>69</LCM_STATE><STIME>0</STIME><TEMPLATE><SCHED_ACTION><ID>0</ID><ACTION>backup</ACTION>"
        "<ARGS>100,0</ARGS><TIME>+3600</TIME><REPEAT>0</REPEAT><DAYS>1,5</DAYS><END_TYPE>1</END_TYPE>"
        "<END_VALUE>4</END_VALUE><DONE>-1</DONE><MESSAGE>host unreachable</MESSAGE></SCHED_ACTION></TEMPLATE>"
        "<USER_TEMPLATE/><HISTORY_RECORDS><HISTORY><HOSTNAME>old</HOSTNAME></HISTORY>"
        "<HISTORY><HOSTNAME>kvm3</HOSTNAME></HISTORY></HISTORY_RECORDS>"
        "<BACKUPS><BACKUP_CONFIG><KEEP_LAST>2</KEEP_LAST></BACKUP_CONFIG>"
        "<BACKUP_IDS><ID>12</ID><ID>15</ID></BACKUP_IDS></BACKUPS></VM>",
        0,
    ]
    assert main(["vm", "show", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "LCM_STATE           : BACKUP" in lines
    assert "HOST                : kvm3" in lines
    header = lines.index("SCHEDULED ACTIONS")
    assert lines[header + 1].split() == ["ID", "ACTION", "ARGS", "SCHEDULED", "REPEAT", "END", "STATUS"]
    assert lines[header + 2].split() == ["0", "backup", "100,0", "+3600", "Weekly", "1,5", "after", "4", "times",
                                         "Error!", "host", "unreachable"]  # fmt: skip
    assert lines[lines.index("BACKUP CONFIGURATION") + 1] == 'KEEP_LAST="2"'
    assert "IMAGE IDS: 12,15" in lines


def test_http_errors_exit_1(stub, capsys) -> None:
    assert main(["--endpoint", stub.endpoint.replace("/RPC2", "/nope"), "host", "list"]) == 1
    assert (
        capsys.readouterr().err
        == f"cannot use vmsched at {stub.endpoint.replace('/RPC2', '/nope')}: HTTP 404 Not Found\n"
    )


def test_a_silent_daemon_times_out(capsys, monkeypatch, tmp_path) -> None:
    auth = tmp_path / "auth"
    auth.write_text("alice:pw\n")
    monkeypatch.setenv("VMSCHED_AUTH", str(auth))
    with socket.socket() as silent:  # listens (the kernel accepts the connection) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/RPC2"
        assert main(["--endpoint", url, "--timeout", "0.2", "vm", "list"]) == 1
    assert capsys.readouterr().err == f"cannot reach vmsched at {url}: timed out\n"


def test_malformed_xml_from_the_daemon_exits_1(stub, capsys) -> None:
    stub.replies["one.hostpool.info"] = [True, "<HOST_POOL><HOST>", 0]
    assert main(["host", "list"]) == 1
    assert capsys.readouterr().err.startswith("the daemon sent malformed XML")
