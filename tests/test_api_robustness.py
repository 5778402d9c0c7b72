"""The daemon under hostile input and violent death: it keeps serving, and loses nothing acknowledged."""

from __future__ import annotations

import signal
import threading
import urllib.request
import xmlrpc.client
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree

from tests.conftest import Daemon, start_daemon

METHODS = [
    "one.vm.allocate", "one.vm.info", "one.vm.update", "one.vm.updateconf", "one.vm.rename", "one.vm.recover",
    "one.vm.deploy", "one.vmpool.info", "one.host.allocate", "one.host.update", "one.host.status",
    "one.datastore.allocate", "one.datastore.update", "one.image.delete", "one.user.allocate", "one.user.passwd",
    "one.system.version", "one.nothing",
]

xmlrpc_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**31), 2**31 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=200),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10,
)
template_text = st.text(alphabet=st.sampled_from(list('ABCDE_=[],"# \n\\<>/x1')), max_size=120)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory):
    running = start_daemon(tmp_path_factory.mktemp("fuzz") / "state")
    yield running
    assert running.stop() == 0
    assert "Traceback" not in running.log(), running.log()


def post(daemon: Daemon, body: bytes) -> bytes:
    request = urllib.request.Request(daemon.endpoint, data=body, headers={"Content-Type": "text/xml"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
        return response.read()


def assert_clean_reply(reply: bytes) -> None:
    root = etree.fromstring(reply)  # well-formed XML-RPC, always
    assert root.tag == "methodResponse"
    text = reply.decode()
    assert "Traceback" not in text and "internal error" not in text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(METHODS), args=st.lists(xmlrpc_values | template_text, max_size=5))
def test_fuzzed_calls_get_replies_not_tracebacks(fuzzed: Daemon, method: str, args: list) -> None:
    body = xmlrpc.client.dumps((fuzzed.session, *args), method, allow_none=True).encode()
    assert_clean_reply(post(fuzzed, body))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_fuzzed_bodies_get_faults(fuzzed: Daemon, body: bytes) -> None:
    assert_clean_reply(post(fuzzed, body))


def test_entity_expansion_is_not_performed(fuzzed: Daemon) -> None:
    bomb = (
        b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">'
        b'<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;"><!ENTITY d "&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;">]>'
        b"<methodCall><methodName>one.system.version</methodName><params><param><value>&d;</value></param>"
        b"</params></methodCall>"
    )
    assert_clean_reply(post(fuzzed, bomb))
    template_bomb = '<!DOCTYPE t [<!ENTITY x SYSTEM "file:///etc/passwd">]><TEMPLATE><NAME>&x;</NAME></TEMPLATE>'
    with xmlrpc.client.ServerProxy(fuzzed.endpoint) as proxy:
        reply = proxy.one.vm.allocate(fuzzed.session, template_bomb, False)
        if reply[0]:
            assert "root:" not in proxy.one.vm.info(fuzzed.session, reply[1])[1]


def test_kill_9_during_a_burst_of_writes_loses_nothing_acknowledged(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path / "state")
    acknowledged: dict[int, str] = {}
    enough = threading.Event()
    stop = threading.Event()

    def writer(worker: int) -> None:
        proxy = xmlrpc.client.ServerProxy(daemon.endpoint)
        n = 0
        while not stop.is_set():
            name = f"w{worker}-{n}"
            try:
                ok, vm_id, *_ = proxy.one.vm.allocate(daemon.session, f'NAME = "{name}"\nNOTE = "{"x" * 500}"')
            except (OSError, xmlrpc.client.ProtocolError):
                return  # the daemon is gone
            if ok:
                acknowledged[vm_id] = name
            n += 1
            if len(acknowledged) >= 150:
                enough.set()

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    assert enough.wait(60), "the writers did not get 150 acknowledgements"
    daemon.process.send_signal(signal.SIGKILL)  # in the middle of the burst: writers are still sending
    daemon.process.wait(10)
    stop.set()
    for thread in threads:
        thread.join(10)

    again = start_daemon(daemon.state_dir)
    try:
        with xmlrpc.client.ServerProxy(again.endpoint) as proxy:
            ok, pool, *_ = proxy.one.vmpool.infoextended(again.session, -2, -1, -1, -1)
            assert ok, pool
            present = {int(vm.findtext("ID")): vm for vm in etree.fromstring(pool.encode()).findall("VM")}
            for vm_id, name in acknowledged.items():
                assert vm_id in present, f"acknowledged VM {vm_id} lost"
                assert present[vm_id].findtext("NAME") == name
                assert len(present[vm_id].findtext("USER_TEMPLATE/NOTE")) == 500  # whole, not torn
            ok, new_id, *_ = proxy.one.vm.allocate(again.session, 'NAME = "after"')
            assert ok and new_id > max(present)
    finally:
        assert again.stop() == 0
