"""VM templates through the API (one.template.*, one.templatepool.info, vmsched.template.instantiate's
refusals) and ``vmsched template`` against a real daemon; object XML checked against the 7.0 schemas."""

from __future__ import annotations

import xmlrpc.client
from pathlib import Path

import pyone
import pytest
from lxml import etree

from scheduler.cli import main
from tests import xsd
from tests.conftest import Daemon, start_daemon

AUTHORIZATION, NO_EXISTS, ACTION, INTERNAL = 0x200, 0x400, 0x800, 0x2000
UUID = "6c1f0d4e-93a1-4c8e-b7c2-5f0e1d2c3b4a"
DOMAIN_XML = (f"<domain type='qemu'>\n  <name>web-restored</name>\n  <uuid>{UUID}</uuid>\n"
              "  <memory unit='MiB'>64</memory>\n  <description>a \"quoted\" &amp; escaped text</description>\n"
              "  <os><type arch='x86_64'>hvm</type></os>\n</domain>\n")


def template_text(name: str = "web-restored", domain_xml: str | None = DOMAIN_XML) -> str:
    from scheduler.model.template import Template, Vector

    template = Template([("NAME", name), ("MEMORY", "64"), ("DISK", Vector({"IMAGE_ID": "7"})),
                         ("CONTEXT", Vector({"NETWORK": "YES"}))])
    if domain_xml is not None:
        template.add("VMSCHED_DOMAIN_XML", domain_xml)
    return template.render()


def raw(daemon: Daemon, method: str, *args: object, session: str | None = None) -> list:
    with xmlrpc.client.ServerProxy(daemon.endpoint) as proxy:
        return getattr(proxy, method)(session or daemon.session, *args)


def value(daemon: Daemon, method: str, *args: object, session: str | None = None) -> object:
    ok, result, *_ = raw(daemon, method, *args, session=session)
    assert ok, result
    return result


def failure(daemon: Daemon, method: str, *args: object, session: str | None = None) -> tuple[str, int]:
    ok, message, code, *_ = raw(daemon, method, *args, session=session)
    assert not ok, message
    return message, code


def test_allocate_info_pool_and_delete(daemon: Daemon, one: pyone.OneServer) -> None:
    template_id = value(daemon, "one.template.allocate", template_text())
    body = str(value(daemon, "one.template.info", template_id))
    xsd.validate(body, "vmtemplate")
    element = etree.fromstring(body.encode())
    assert (element.findtext("NAME"), element.findtext("UNAME"), element.find("TEMPLATE/NAME")) == (
        "web-restored", "oneadmin", None)
    assert element.findtext("TEMPLATE/VMSCHED_DOMAIN_XML") == DOMAIN_XML  # kept byte for byte
    assert element.findtext("TEMPLATE/DISK/IMAGE_ID") == "7" and int(element.findtext("REGTIME")) > 0
    assert element.findtext("PERMISSIONS/OWNER_U") == "1"
    second = value(daemon, "one.template.allocate", template_text("other", domain_xml=None))
    pool = str(value(daemon, "one.templatepool.info", -2, -1, -1))
    xsd.validate(pool, "vmtemplate_pool")
    assert [t.findtext("ID") for t in etree.fromstring(pool.encode())] == [str(template_id), str(second)]
    only_second = etree.fromstring(str(value(daemon, "one.templatepool.info", -2, second, -1)).encode())
    assert [t.findtext("NAME") for t in only_second] == ["other"]
    # pyone reads the objects with OpenNebula's bindings
    assert one.template.info(template_id).NAME == "web-restored"
    assert [t.ID for t in one.templatepool.info(-2, -1, -1).VMTEMPLATE] == [template_id, second]
    assert value(daemon, "one.template.delete", template_id) == template_id
    assert failure(daemon, "one.template.info", template_id) == (
        f"[one.template.info] Error getting VM template [{template_id}].", NO_EXISTS)
    xsd.validate(str(value(daemon, "one.templatepool.info", -2, -1, -1)), "vmtemplate_pool")


BAD_TEMPLATES = [
    ("no NAME", 'MEMORY = "64"', "name cannot be empty", INTERNAL),
    ("syntax error", 'NAME = "x', "unterminated", INTERNAL),
    ("a domain XML that does not parse", template_text(domain_xml="<domain>"), "VMSCHED_DOMAIN_XML", INTERNAL),
    ("a domain XML without UUID", template_text(domain_xml="<domain><name>a</name></domain>"), "no uuid", INTERNAL),
]


@pytest.mark.parametrize(("case", "text", "message", "code"), BAD_TEMPLATES, ids=[c[0] for c in BAD_TEMPLATES])
def test_allocate_refuses(daemon: Daemon, case: str, text: str, message: str, code: int) -> None:
    found, found_code = failure(daemon, "one.template.allocate", text)
    assert message in found and found_code == code


def test_names_are_unique_per_owner_and_recursive_delete_is_refused(daemon: Daemon) -> None:
    template_id = value(daemon, "one.template.allocate", template_text())
    message, code = failure(daemon, "one.template.allocate", template_text())
    assert f"NAME is already taken by TEMPLATE {template_id}" in message and code == INTERNAL
    message, code = failure(daemon, "one.template.delete", template_id, True)
    assert "recursive" in message and code == ACTION
    assert str(template_id) in str(value(daemon, "one.templatepool.info", -2, -1, -1))


def test_users_see_and_delete_only_their_own(daemon: Daemon) -> None:
    value(daemon, "one.user.allocate", "carol", "carol-pw", "core", [])
    carol = "carol:carol-pw"
    theirs = value(daemon, "one.template.allocate", template_text())
    mine = value(daemon, "one.template.allocate", template_text(), session=carol)  # same name, other owner
    assert etree.fromstring(str(value(daemon, "one.template.info", mine, session=carol)).encode()).findtext(
        "UNAME") == "carol"
    for method, args in (("one.template.info", (theirs,)), ("one.template.delete", (theirs,)),
                         ("vmsched.template.instantiate", (mine, 0, False))):
        assert failure(daemon, method, *args, session=carol)[1] == AUTHORIZATION, method
    seen = etree.fromstring(str(value(daemon, "one.templatepool.info", -2, -1, -1, session=carol)).encode())
    assert [t.findtext("ID") for t in seen] == [str(mine)]
    everything = etree.fromstring(str(value(daemon, "one.templatepool.info", -2, -1, -1)).encode())
    assert [t.findtext("ID") for t in everything] == [str(theirs), str(mine)]
    assert value(daemon, "one.template.delete", mine, session=carol) == mine


def test_instantiate_refusals_come_before_any_host_is_touched(daemon: Daemon) -> None:
    host_id = value(daemon, "one.host.allocate", "kvm-nowhere", "kvm", "kvm", -1)
    plain = value(daemon, "one.template.allocate", template_text("plain", domain_xml=None))
    message, code = failure(daemon, "vmsched.template.instantiate", plain, host_id, False)
    assert "has no libvirt domain" in message and code == ACTION
    restored = value(daemon, "one.template.allocate", template_text())
    assert failure(daemon, "vmsched.template.instantiate", restored, 99, False)[1] == NO_EXISTS
    vm_id = value(daemon, "one.vm.allocate", f'NAME = "original"\nOS = [ UUID = "{UUID}" ]')
    message, code = failure(daemon, "vmsched.template.instantiate", restored, host_id, False)
    assert f"its domain {UUID} is VM {vm_id}" in message and code == ACTION
    value(daemon, "one.vm.recover", vm_id, 3)
    bad_schedule = value(daemon, "one.template.allocate",
                         template_text("bad-schedule") + 'SCHED_ACTION = [ ACTION = "backup", ARGS = "42", TIME = "1" ]\n')
    message, code = failure(daemon, "vmsched.template.instantiate", bad_schedule, host_id, False)
    assert "SCHED_ACTION #0" in message and "datastore [42]" in message and code == INTERNAL


def test_templates_survive_a_restart(tmp_path: Path) -> None:
    first = start_daemon(tmp_path / "state")
    try:
        template_id = value(first, "one.template.allocate", template_text())
        before = value(first, "one.template.info", template_id)
    finally:
        assert first.stop() == 0
    again = start_daemon(tmp_path / "state")
    try:
        assert value(again, "one.template.info", template_id) == before
        assert value(again, "one.template.allocate", template_text("next")) == template_id + 1
    finally:
        assert again.stop() == 0
    assert "Traceback" not in again.log()


# ---- vmsched template ---------------------------------------------------------------------------------


def cli(daemon: Daemon, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        *argv: str) -> tuple[int, str, str]:
    for key in ("VMSCHED_ENDPOINT", "VMSCHED_AUTH", "HOME"):
        monkeypatch.setenv(key, daemon.env[key])
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_create_list_show_delete(daemon: Daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "restored.tmpl"
    path.write_text(template_text())
    code, out, err = cli(daemon, monkeypatch, capsys, "template", "create", str(path))
    assert code == 0, err
    template_id = int(out.split()[1])
    code, out, _ = cli(daemon, monkeypatch, capsys, "template", "list")
    rows = [line.split() for line in out.splitlines()]
    assert rows[0][:4] == ["ID", "USER", "GROUP", "NAME"] and rows[1][:4] == [
        str(template_id), "oneadmin", "oneadmin", "web-restored"]
    code, out, _ = cli(daemon, monkeypatch, capsys, "template", "show", "web-restored")
    assert code == 0 and f"LIBVIRT DOMAIN      : web-restored ({UUID})" in out
    assert 'NETWORK="YES"' in out and "VMSCHED_DOMAIN_XML" not in out
    code, out, _ = cli(daemon, monkeypatch, capsys, "template", "show", str(template_id), "--xml")
    assert etree.fromstring(out.encode()).findtext("TEMPLATE/VMSCHED_DOMAIN_XML") == DOMAIN_XML
    code, out, err = cli(daemon, monkeypatch, capsys, "template", "instantiate", "web-restored", "--host", "nowhere")
    assert code == 1 and "no host named 'nowhere'" in err
    code, _, err = cli(daemon, monkeypatch, capsys, "template", "delete", "web-restored")
    assert code == 0, err
    code, out, _ = cli(daemon, monkeypatch, capsys, "template", "list", "--json")
    assert code == 0 and '"VMTEMPLATE": []' in out


def test_cli_instantiate_reports_the_refusal(daemon: Daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    value(daemon, "one.host.allocate", "kvm-nowhere", "kvm", "kvm", -1)
    value(daemon, "one.template.allocate", template_text("plain", domain_xml=None))
    code, _, err = cli(daemon, monkeypatch, capsys, "template", "instantiate", "plain", "--host", "kvm-nowhere")
    assert code == 1 and "has no libvirt domain" in err


def test_what_an_instantiated_vm_takes_from_its_template() -> None:
    from scheduler.api.templates import settings_of
    from scheduler.model.template import Template

    settings = settings_of(Template.parse(
        template_text() + 'CPU = "2"\nNIC = [ MODEL = "virtio" ]\nOS = [ UUID = "x", BOOT = "disk0" ]\n'
        'GRAPHICS = [ TYPE = "VNC" ]\nLABELS = "restored"\nBACKUP_CONFIG = [ KEEP_LAST = "4" ]\n'
        'SCHED_ACTION = [ ACTION = "poweroff", TIME = "+60" ]\n'))
    assert settings.template.names() == ["CONTEXT", "GRAPHICS"]  # CPU, MEMORY, DISK, NIC: from the domain
    assert settings.user_template.names() == ["LABELS"]
    assert dict(settings.os_keys.items()) == {"BOOT": "disk0"}
    assert settings.backup_config is not None and settings.backup_config.get("KEEP_LAST") == "4"
    assert len(settings.sched_actions) == 1
