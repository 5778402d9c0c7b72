"""Backup datastore monitoring (scheduler/hosts/dsmonitor.py): the pure recording, then a daemon probing an ``fs``
datastore on this machine and an ``rsync`` one on the realenv backup server."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from lxml import etree

from drivers.datastore import Capacity
from scheduler.hosts.dsmonitor import ERROR_KEY, recorded
from scheduler.model.objects.datastore import Datastore
from scheduler.model.objects.states import DatastoreType
from tests.conftest import start_daemon
from tests.realenv.model import RealEnv
from tests.test_hosts_real import free_port
from tests.test_import_real import Api

WAIT = 30.0


def backup_ds() -> Datastore:
    return Datastore(id=3, name="b", type=DatastoreType.BACKUP_DS, ds_mad="fs")


def test_recorded_figures_errors_and_no_change() -> None:
    ds = recorded(backup_ds(), Capacity(total_mb=1000, free_mb=600, used_mb=400))
    assert ds is not None and (ds.total_mb, ds.free_mb, ds.used_mb) == (1000, 600, 400)
    assert recorded(ds, Capacity(1000, 600, 400)) is None  # nothing changed: nothing written
    failed = recorded(ds, "backup.example:22: connection refused")
    assert failed is not None and (failed.total_mb, failed.free_mb) == (1000, 600)  # the last figures stay
    assert failed.template.get(ERROR_KEY) == "backup.example:22: connection refused"
    assert recorded(failed, "backup.example:22: connection refused") is None
    back = recorded(failed, Capacity(1000, 500, 500))
    assert back is not None and ERROR_KEY not in back.template and back.free_mb == 500


def wait_for(api: Api, ds_id: int, condition: Callable[[etree._Element], bool]) -> etree._Element:
    deadline = time.monotonic() + WAIT
    while True:
        ds = etree.fromstring(str(api.call("one.datastore.info", ds_id)).encode())
        if condition(ds):
            return ds
        assert time.monotonic() < deadline, etree.tostring(ds).decode() + api.daemon.log()[-2000:]
        time.sleep(0.05)


@pytest.mark.realenv
def test_a_daemon_monitors_its_backup_datastores(realenv: RealEnv, tmp_path: Path) -> None:
    ssh = realenv.ssh
    daemon = start_daemon(tmp_path / "state", f'MONITORING_INTERVAL_DATASTORE = "3600"\n'
                                              f'SSH = [ KNOWN_HOSTS = "{ssh.known_hosts}", KEY = "{ssh.client_key}" ]\n')
    api = Api(daemon, {})
    try:
        base = tmp_path / "fsds"
        fs_id = int(api.call("one.datastore.allocate",  # type: ignore[call-overload]
                             f'NAME = "fsbk"\nTYPE = "BACKUP_DS"\nDS_MAD = "fs"\nBASE_PATH = "{base}"', -1))
        ds = wait_for(api, fs_id, lambda d: int(d.findtext("TOTAL_MB") or 0) > 0)  # at once, not in an hour
        usage = shutil.disk_usage(base)
        assert abs(int(ds.findtext("TOTAL_MB") or 0) - usage.total / 2**20) <= 1  # df -B1M rounds up
        assert 0 < int(ds.findtext("FREE_MB") or 0) <= int(ds.findtext("TOTAL_MB") or 0)  # others write meanwhile
        api.call("one.datastore.update", fs_id, 'LIMIT_MB = "100"', 1)
        ds = wait_for(api, fs_id, lambda d: d.findtext("TOTAL_MB") == "100")

        backup = realenv.backup
        closed = free_port()
        rsync_id = int(api.call("one.datastore.allocate",  # type: ignore[call-overload]
                                f'NAME = "rsyncbk"\nTYPE = "BACKUP_DS"\nDS_MAD = "rsync"\n'
                                f'BASE_PATH = "{backup.data_dir}/dsmon"\nRSYNC_HOST = "{backup.address}"\n'
                                f'RSYNC_USER = "{backup.user}"\nRSYNC_PORT = "{closed}"', -1))
        ds = wait_for(api, rsync_id, lambda d: bool(d.findtext(f"TEMPLATE/{ERROR_KEY}")))
        assert str(closed) in (ds.findtext(f"TEMPLATE/{ERROR_KEY}") or "")
        assert ds.findtext("TOTAL_MB") == "0"
        api.call("one.datastore.update", rsync_id, f'RSYNC_PORT = "{backup.ssh_port}"', 1)
        ds = wait_for(api, rsync_id, lambda d: int(d.findtext("TOTAL_MB") or 0) > 0)
        assert ds.findtext(f"TEMPLATE/{ERROR_KEY}") is None
        assert "cannot monitor" in daemon.log() and "monitored again" in daemon.log()

        host = realenv.host("host1")  # an image datastore on a host: df runs there
        host_id = int(api.call("one.host.allocate", "host1", "kvm", "kvm", -1))  # type: ignore[call-overload]
        api.call("one.host.update", host_id, f'SSH_HOST = "{host.address}"\nSSH_PORT = "{host.ssh_port}"\n'
                                             f'SSH_USER = "{host.user}"', 1)
        images = tmp_path / "images-on-host1"
        image_id = int(api.call("one.datastore.allocate",  # type: ignore[call-overload]
                                f'NAME = "imgs"\nTYPE = "IMAGE_DS"\nDS_MAD = "fs"\nBRIDGE_LIST = "host1"\n'
                                f'BASE_PATH = "{images}"', -1))
        wait_for(api, image_id, lambda d: int(d.findtext("TOTAL_MB") or 0) > 0)
        assert images.is_dir()  # created by the probe (host1 shares this machine's /tmp)
        api.call("one.datastore.update", image_id, 'BRIDGE_LIST = "nohost"', 1)
        ds = wait_for(api, image_id, lambda d: bool(d.findtext(f"TEMPLATE/{ERROR_KEY}")))
        assert "'nohost', which is not a registered host" in (ds.findtext(f"TEMPLATE/{ERROR_KEY}") or "")
    finally:
        assert daemon.stop() == 0, daemon.log()[-3000:]
