"""Monitoring a host's reach to its Ceph cluster: the pure parts (the probe's command, the template keys, the hold
of backups of VMs with RBD disks), then the real host1 against the real single-node Ceph, reachable and not, and a
backup of a VM with an RBD disk that waits with the reason until the host reaches the cluster again."""

from __future__ import annotations

import socket
import time

import pytest
from lxml import etree

from drivers.tm import rbdplan
from drivers.tm.rbdplan import RbdAccess, RbdTimeouts
from scheduler.errors import ValidationError
from scheduler.hosts import imageds
from scheduler.hosts.dsmonitor import ERROR_KEY
from scheduler.hosts.monitor import CephReach, DiskSpace, Probe, host_ceph_access, record_success
from scheduler.model.objects.datastore import Datastore
from scheduler.model.objects.host import Host, ceph_hold
from scheduler.model.objects.states import DatastoreType
from scheduler.model.template import Template, Vector
from tests.realenv.ceph import CephCluster, RbdDomain
from tests.test_backup_faults_real import last_run, wait_run
from tests.test_backup_real import Setup, setup  # noqa: F401 - setup is a fixture
from tests.test_ceph_backup_real import rbd_domain  # noqa: F401 - a fixture
from tests.test_dsmonitor import wait_for

WAIT = 60.0


def host_with(**values: str) -> Host:
    template = Template()
    for key, value in values.items():
        template.set(key, value)
    return Host(id=3, name="kvm3", template=template)


def test_the_health_probe_carries_the_access_and_bounded_waits() -> None:
    argv = rbdplan.health_argv(RbdAccess("libvirt", "/k", "/c.conf", ("m1:3300",)), RbdTimeouts(4, 5, 6))
    assert argv == ["ceph", "--id", "libvirt", "--keyfile", "/k", "--conf", "/c.conf", "--mon-host", "m1:3300",
                    "--client-mount-timeout", "4", "--rados-mon-op-timeout", "5", "--rados-osd-op-timeout", "6",
                    "--connect-timeout", "4", "health"]


def test_only_a_host_that_names_a_cluster_is_probed_for_it() -> None:
    assert host_ceph_access(host_with(SSH_HOST="h")) is None
    assert host_ceph_access(host_with(CEPH_CONF="/etc/ceph/c.conf", CEPH_USER="u")) == RbdAccess("u", "", "/etc/ceph/c.conf")
    assert host_ceph_access(host_with(CEPH_HOST="m1, m2:3300")) == RbdAccess(mon_hosts=("m1", "m2:3300"))


def test_the_reach_is_recorded_and_forgotten_with_the_probe() -> None:
    probe = Probe("9.0.0", "7.2.0", DiskSpace(10, 5), frozenset({"rbd"}), CephReach(error="rbd: timed out\n (110)"))
    down = record_success(host_with(CEPH_HEALTH="HEALTH_OK"), probe, 100)
    assert (down.template.get("CEPH_REACH"), down.template.get("CEPH_ERROR")) == ("NO", "rbd: timed out (110)")
    assert down.template.get("CEPH_HEALTH") is None
    up = record_success(down, Probe("9.0.0", "7.2.0", DiskSpace(10, 5), frozenset(), CephReach(health="HEALTH_OK")), 101)
    assert (up.template.get("CEPH_REACH"), up.template.get("CEPH_HEALTH"), up.template.get("CEPH_ERROR")) == (
        "YES", "HEALTH_OK", None)
    gone = record_success(up, Probe("9.0.0", "7.2.0", DiskSpace(10, 5), frozenset()), 102)
    assert all(gone.template.get(k) is None for k in ("CEPH_REACH", "CEPH_HEALTH", "CEPH_ERROR"))


def test_backups_of_vms_with_rbd_disks_wait_on_a_host_that_cannot_reach_the_cluster() -> None:
    rbd, file = Vector([("TYPE", "RBD")]), Vector([("TYPE", "FILE")])
    down = host_with(CEPH_REACH="NO", CEPH_ERROR="connection timed out")
    assert ceph_hold(down, [file, rbd]) == ("host kvm3 cannot reach the Ceph cluster of the VM's RBD disks "
                                            "(connection timed out)")
    assert ceph_hold(down, [file]) == ""  # a VM of file disks only is not held
    assert ceph_hold(host_with(CEPH_REACH="YES"), [rbd]) == "" and ceph_hold(host_with(), [rbd]) == ""


# ---- real -------------------------------------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def host_template(s: Setup) -> etree._Element:
    found = etree.fromstring(str(s.api.call("one.host.info", s.api.hosts["host1"])).encode()).find("TEMPLATE")
    assert found is not None
    return found


def wait_reach(s: Setup, reach: str, since: int) -> etree._Element:
    """host1's TEMPLATE once a probe newer than ``since`` recorded CEPH_REACH = ``reach``."""
    deadline = time.monotonic() + WAIT
    while True:
        template = host_template(s)
        if template.findtext("CEPH_REACH") == reach and int(template.findtext("MONITOR_TIME") or "0") > since:
            return template
        assert time.monotonic() < deadline, etree.tostring(template).decode()
        time.sleep(0.1)


@pytest.mark.realenv
def test_an_unreachable_cluster_holds_rbd_backups_with_the_reason_until_the_host_reaches_it(
        setup: Setup, ceph: CephCluster, rbd_domain: RbdDomain) -> None:  # noqa: F811
    s = setup
    host = s.api.hosts["host1"]
    since = int(time.time()) - 1
    s.api.call("one.host.update", host, f'CEPH_CONF = "{ceph.conf}"', 1)  # probed at once
    template = wait_reach(s, "YES", since)
    assert (template.findtext("CEPH_HEALTH") or "").startswith("HEALTH_")
    vm_id = s.api.import_one("host1", rbd_domain.name)

    since = int(time.time())
    started = time.monotonic()
    s.api.call("one.host.update", host, f'CEPH_HOST = "127.0.0.1:{closed_port()}"', 1)
    template = wait_reach(s, "NO", since)
    assert time.monotonic() - started < 30  # within the probe's timeouts, not librados' 300 s
    error = template.findtext("CEPH_ERROR") or ""
    assert error and template.findtext("CEPH_HEALTH") is None
    before = last_run(s.api, vm_id)
    s.api.call("one.vm.backup", vm_id, s.rsync_ds, False)
    status = wait_run(s.api, vm_id, before, until=("queued",))
    assert "cannot reach the Ceph cluster of the VM's RBD disks" in str(status["MESSAGE"]), status
    assert status["STATE"] == "queued"

    since = int(time.time())
    s.api.call("one.host.update", host, 'CEPH_HOST = ""', 1)  # reachable again: the waiting backup starts
    wait_reach(s, "YES", since)
    done = wait_run(s.api, vm_id, before)
    assert done["STATE"] == "done", (done, s.api.daemon.log()[-3000:])


def test_the_pool_space_is_read_from_ceph_df() -> None:
    assert rbdplan.df_argv(RbdAccess("libvirt", conf="/c.conf"), RbdTimeouts(5, 5, 5))[-7:] == [
        "--rados-osd-op-timeout", "5", "--connect-timeout", "5", "df", "--format", "json"]
    output = ('{"pools": [{"name": "device_health_metrics", "stats": {"stored": 0, "max_avail": 10}},'
              ' {"name": "one", "stats": {"stored": 3145728, "max_avail": 7856092672}}]}')
    assert rbdplan.parse_pool_space(output, "one") == (3145728, 7856092672)
    with pytest.raises(ValidationError, match="no pool 'two' .*device_health_metrics, one"):
        rbdplan.parse_pool_space(output, "two")
    with pytest.raises(ValidationError, match="cannot read the space of pool 'one'"):
        rbdplan.parse_pool_space('{"pools": [{"name": "one"}]}', "one")


def ceph_image_ds(ds_mad: str = "ceph", **values: str) -> Datastore:
    datastore = Datastore(id=7, name="cephimg", type=DatastoreType.IMAGE_DS, ds_mad=ds_mad)
    for key, value in values.items():
        datastore.template.set(key, value)
    return datastore


def test_a_ceph_image_datastore_is_watched_needs_a_plain_pool_name_and_is_no_restore_target_yet() -> None:
    assert imageds.is_monitored(ceph_image_ds()) and not imageds.is_image_datastore(ceph_image_ds())
    assert imageds.is_monitored(ceph_image_ds("fs")) and not imageds.is_monitored(ceph_image_ds("vcenter"))
    pool, access = imageds.ceph_pool(ceph_image_ds(POOL_NAME="one", CEPH_USER="libvirt", CEPH_CONF="/c.conf"))
    assert (pool, access.user, access.conf) == ("one", "libvirt", "/c.conf")
    with pytest.raises(ValidationError, match="datastore 7: a Ceph image datastore needs POOL_NAME"):
        imageds.ceph_pool(ceph_image_ds())
    with pytest.raises(ValidationError, match="datastore 7: POOL_NAME '-x' is not a plain RBD name"):
        imageds.ceph_pool(ceph_image_ds(POOL_NAME="-x"))
    with pytest.raises(ValidationError, match="datastore 7: CEPH_CONF 'c.conf' must be an absolute path"):
        imageds.ceph_pool(ceph_image_ds(POOL_NAME="one", CEPH_CONF="c.conf"))


@pytest.mark.realenv
def test_a_ceph_image_datastore_is_monitored_by_ceph_df_on_its_bridge_host(
        setup: Setup, ceph: CephCluster) -> None:  # noqa: F811
    s = setup
    ds_id = s.datastore(f'NAME = "cephimg"\nTYPE = "IMAGE_DS"\nDS_MAD = "ceph"\nPOOL_NAME = "{ceph.pool}"\n'
                        f'BRIDGE_LIST = "host1"\nCEPH_USER = "{ceph.client}"\nCEPH_CONF = "{ceph.conf}"')
    ds = wait_for(s.api, ds_id, lambda d: int(d.findtext("TOTAL_MB") or 0) > 0)  # probed when allocated
    assert ds.findtext(f"TEMPLATE/{ERROR_KEY}") is None
    stored, available = rbdplan.parse_pool_space(ceph.run("ceph", "df", "--format", "json").stdout, ceph.pool)
    assert abs(int(ds.findtext("FREE_MB") or 0) - available / 2**20) <= 64  # the OSD's own use moves a little
    assert abs(int(ds.findtext("USED_MB") or 0) - stored / 2**20) <= 64
    s.api.call("one.datastore.update", ds_id, 'LIMIT_MB = "100"', 1)
    wait_for(s.api, ds_id, lambda d: d.findtext("TOTAL_MB") == "100")

    s.api.call("one.datastore.update", ds_id, 'POOL_NAME = "nopool"', 1)
    ds = wait_for(s.api, ds_id, lambda d: bool(d.findtext(f"TEMPLATE/{ERROR_KEY}")))
    assert "no pool 'nopool'" in (ds.findtext(f"TEMPLATE/{ERROR_KEY}") or "")
