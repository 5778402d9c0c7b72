"""Pytest fixtures for the real test environment (register with ``pytest_plugins = ["tests.realenv.plugin"]``).

* ``realenv`` (session): runs the idempotent ``up`` once and returns the :class:`RealEnv` description.
  When the environment cannot be created here at all (not root, no apt-get) the test is skipped with the
  reason printed loudly, or fails with it when ``VMSCHED_REQUIRE_REALENV=1`` (CI sets it: there a skipped
  real test would check nothing); any other failure of ``up`` is an error.
* ``ceph`` (session): the single-node Ceph cluster (:mod:`tests.realenv.ceph`), started on first use and
  stopped by ``down`` with the rest; the hypervisors reach it as ``client.hypervisor``.
* ``hypervisors`` (session): a cached :class:`Hypervisor` (libvirt over ssh) per host name.
* ``tiny_domain`` (function): a factory ``tiny_domain(host="host1", *, start=True, cdrom=False)`` for
  tiny QEMU domains in the test's tmp_path; every domain it made is destroyed and undefined afterwards.
* ``agent_guest_image`` (session): the real Linux guest image with the QEMU guest agent, built once into
  ``DIR/agent-guest`` (cached across sessions).
* ``agent_guest`` (function): a running :class:`AgentGuest` on host1 whose agent answers, shared by the tests
  of one module (one boot per module). It is started again when a test left it stopped; a test that leaves
  it frozen gets an error at teardown (after the guest is thawed for the next test).

Set ``VMSCHED_REALENV_TEARDOWN=1`` to run ``down`` at the end of the session (default: leave it running,
so the next ``up`` is warm).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
import pytest

from tests.realenv import ceph as ceph_env
from tests.realenv import realenv as realenv_cli
from tests.realenv.agentguest import AgentGuest, GuestImage, ensure_image
from tests.realenv.ceph import CephCluster
from tests.realenv.domains import Hypervisor, TinyDomain
from tests.realenv.errors import EnvUnavailable
from tests.realenv.model import HostInfo, RealEnv

TEARDOWN_ENV_VAR = "VMSCHED_REALENV_TEARDOWN"
REQUIRE_ENV_VAR = "VMSCHED_REQUIRE_REALENV"  # "1": a real environment that cannot exist fails the tests
AGENT_GUEST_DIR = "agent-guest"
AGENT_GUEST_HOST = "host1"


def _shout(config: pytest.Config, message: str) -> None:
    """Print ``message`` to the terminal now, past output capturing, between two banners."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None:
        return
    banner = "!" * 20 + " REAL TEST ENVIRONMENT UNAVAILABLE " + "!" * 20
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        reporter.write_line("")
        for line in (banner, message, banner):
            reporter.write_line(line, red=True, bold=True)


@pytest.fixture(scope="session")
def realenv(request: pytest.FixtureRequest) -> Iterator[RealEnv]:
    libvirt.registerErrorHandler(lambda *_: None, None)  # errors arrive as exceptions; keep stderr clean
    try:
        env = realenv_cli.up()
    except EnvUnavailable as exc:  # pytest caches this outcome: every later test skips without retrying
        reason = f"real test environment cannot be created here: {exc}"
        _shout(request.config, reason)
        if os.environ.get(REQUIRE_ENV_VAR) == "1":
            pytest.fail(f"{reason} ({REQUIRE_ENV_VAR}=1: the real tests must run)", pytrace=False)
        pytest.skip(reason)
    yield env
    if os.environ.get(TEARDOWN_ENV_VAR) == "1":
        realenv_cli.down(env.dir)


@pytest.fixture(scope="session")
def ceph(realenv: RealEnv) -> CephCluster:
    """The single-node Ceph cluster (tests.realenv.ceph), started on first use and kept like the hosts."""
    return ceph_env.up(realenv.dir / realenv_cli.CEPH_DIR)


@pytest.fixture(scope="session")
def hypervisors(realenv: RealEnv) -> Iterator[Callable[[str], Hypervisor]]:
    opened: dict[str, Hypervisor] = {}

    def get(host: str) -> Hypervisor:
        if host not in opened:
            opened[host] = Hypervisor(realenv.host(host))
        return opened[host]

    yield get
    for hypervisor in opened.values():
        hypervisor.close()


@pytest.fixture
def tiny_domain(hypervisors: Callable[[str], Hypervisor],
                tmp_path: Path) -> Iterator[Callable[..., TinyDomain]]:
    made: list[TinyDomain] = []

    def make(host: str | HostInfo = "host1", *, start: bool = True, cdrom: bool = False,
             vdb_format: str = "raw") -> TinyDomain:
        name = host.name if isinstance(host, HostInfo) else host
        dom = hypervisors(name).define(tmp_path / "domains", cdrom=cdrom, start=False, vdb_format=vdb_format)
        made.append(dom)
        if start:
            hypervisors(name).start(dom)
        return dom

    yield make
    for dom in reversed(made):
        hypervisors(dom.host).remove(dom)


@pytest.fixture(scope="session")
def agent_guest_image(realenv: RealEnv) -> GuestImage:
    return ensure_image(realenv.dir / AGENT_GUEST_DIR)


@pytest.fixture(scope="module")
def _agent_guest_of_module(hypervisors: Callable[[str], Hypervisor], agent_guest_image: GuestImage,
                           tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentGuest]:
    hypervisor = hypervisors(AGENT_GUEST_HOST)
    guest = AgentGuest.define(hypervisor.conn, hypervisor.host.name, agent_guest_image,
                              tmp_path_factory.mktemp("agent-guest"))
    try:
        guest.start()
        yield guest
    finally:
        guest.remove()


@pytest.fixture
def agent_guest(_agent_guest_of_module: AgentGuest) -> Iterator[AgentGuest]:
    guest = _agent_guest_of_module
    if not guest.dom.isActive():
        guest.start()
    yield guest
    if guest.dom.isActive() and guest.dom.fsThaw() > 0:
        pytest.fail(f"the test left {guest.name} frozen (thawed now)")
