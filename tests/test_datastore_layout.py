"""Backup datastore layout: path checks, backup ids, backup URLs (spec §5.3), vm.xml sizes; pure."""

from __future__ import annotations

import pytest

from drivers.datastore import layout
from drivers.datastore.base import apply_limit, file_progress, parse_df, parse_digests, parse_stat
from drivers.datastore.layout import Layout
from drivers.datastore.rsync import rsync_options, server_target
from scheduler.errors import DriverError, ValidationError
from scheduler.model.objects.datastore import Datastore
from scheduler.model.objects.states import DatastoreType
from scheduler.model.template import Template


@pytest.mark.parametrize(
    ("path", "normal"),
    [("/var/lib/one/datastores/100", "/var/lib/one/datastores/100"), ("/srv//backups/", "/srv/backups"),
     ("/a/b-c_d.e+f@g,h=i", "/a/b-c_d.e+f@g,h=i")],
)
def test_base_path_accepted_and_normalised(path: str, normal: str) -> None:
    assert layout.check_path(path) == normal


@pytest.mark.parametrize(
    "path",
    ["relative/dir", "", "/", "///", "/srv/../etc", "/srv/..", "/srv/./x", "/srv/a b", "/srv/$(id)", "/srv/x;rm",
     "/srv/`x`", "/srv/x\n", "/srv/x'y", "/srv/*", "~/x", None, 5],
)
def test_base_path_refused(path: object) -> None:
    with pytest.raises(ValidationError):
        layout.check_path(path)  # type: ignore[arg-type]


@pytest.mark.parametrize(("value", "number"), [(0, 0), (17, 17), ("42", 42), ("007", 7)])
def test_ids_accepted(value: object, number: int) -> None:
    assert layout.check_id(value) == number


@pytest.mark.parametrize("value", ["../x", "-1", -1, "1a", "", " 1", "1/2", True, None, 1.0, "٣"])
def test_ids_refused(value: object) -> None:
    with pytest.raises(ValidationError):
        layout.check_id(value)


@pytest.mark.parametrize(
    ("value", "ok"),
    [("8a3454", True), ("25f4b298", True), ("0" * 64, True), ("8a345", False), ("8A3454", False),
     ("8a345g", False), ("../8a3454", False), (".tmp-8a3454", False), ("0" * 65, False), (123456, False)],
)
def test_backup_ids(value: object, ok: bool) -> None:
    if ok:
        assert layout.check_backup_id(value) == value
    else:
        with pytest.raises(ValidationError):
            layout.check_backup_id(value)


@pytest.mark.parametrize(
    ("name", "ok"),
    [("vm.xml", True), ("disk.0.0", True), ("disk.1.3.rbdiff", True), ("domain.xml", True),
     ("../vm.xml", False), ("a/b", False), (".hidden", False), ("..", False), ("", False), ("a b", False)],
)
def test_file_names(name: str, ok: bool) -> None:
    if ok:
        assert layout.check_file_name(name) == name
    else:
        with pytest.raises(ValidationError):
            layout.check_file_name(name)


def test_random_backup_ids_are_six_hex_chars_and_vary() -> None:
    ids = {layout.random_backup_id() for _ in range(50)}
    assert all(layout.check_backup_id(i) and len(i) == 6 for i in ids)
    assert len(ids) > 40


def test_layout_paths() -> None:
    tree = Layout("/srv/backup/100/")
    assert tree.vm_dir(6) == "/srv/backup/100/6"
    assert tree.backup_dir("6", "8a3454") == "/srv/backup/100/6/8a3454"
    assert tree.tmp_dir(6, "8a3454") == "/srv/backup/100/6/.tmp-8a3454"
    assert tree.file_path(6, "8a3454", "disk.0.0") == "/srv/backup/100/6/8a3454/disk.0.0"


@pytest.mark.parametrize(
    "call",
    [lambda t: t.vm_dir("../x"), lambda t: t.backup_dir(6, "../../etc"), lambda t: t.tmp_dir(-1, "8a3454"),
     lambda t: t.file_path(6, "8a3454", "../../../etc/passwd"), lambda t: t.backup_dir("6/..", "8a3454")],
)
def test_layout_refuses_escapes(call: object) -> None:
    with pytest.raises(ValidationError):
        call(Layout("/srv/backup"))  # type: ignore[operator]


def test_layout_refuses_a_bad_base_path() -> None:
    with pytest.raises(ValidationError, match="BASE_PATH"):
        Layout("/srv/backup/../../etc")


@pytest.mark.parametrize(
    ("name", "backup_id"), [(".tmp-8a3454", "8a3454"), ("8a3454", None), (".tmp-", None), (".tmp-../x", None)]
)
def test_tmp_backup_id(name: str, backup_id: str | None) -> None:
    assert layout.tmp_backup_id(name) == backup_id


@pytest.mark.parametrize(
    ("disk_id", "inc", "name"), [(0, 0, "disk.0.0"), (3, 12, "disk.3.12")]
)
def test_disk_file_names_round_trip(disk_id: int, inc: int, name: str) -> None:
    assert layout.disk_file_name(disk_id, inc) == name
    assert layout.disk_index(name) == disk_id


@pytest.mark.parametrize(("name", "index"), [("disk.2.rbd2", 2), ("disk.4.1.rbdiff", 4), ("/a/b/disk.10.0", 10)])
def test_disk_index_of_ceph_and_full_paths(name: str, index: int) -> None:
    assert layout.disk_index(name) == index


@pytest.mark.parametrize("name", ["vm.xml", "disk.x.0", "disks.0.0", "disk0.0"])
def test_disk_index_refuses_other_files(name: str) -> None:
    with pytest.raises(ValidationError):
        layout.disk_index(name)


# --- increment chains (the URLs themselves: tests/test_backup_urls.py) ---------------------------------------

@pytest.mark.parametrize(
    ("up_to", "expected"),
    [(None, "0:a,1:b,2:c"), (0, "0:a"), (1, "0:a,1:b"), (2, "0:a,1:b,2:c")],
)
def test_chain_up_to(up_to: int | None, expected: str) -> None:
    chain = layout.parse_chain("0:a,1:b,2:c")
    assert layout.chain_text(layout.chain_up_to(chain, up_to)) == expected


def test_chain_up_to_a_missing_increment_is_refused() -> None:
    with pytest.raises(ValidationError):
        layout.chain_up_to(layout.parse_chain("0:a,1:b"), 5)


# --- vm.xml ---------------------------------------------------------------------------------------------------

VM_XML = """<VM><ID>6</ID><TEMPLATE>
<DISK><DISK_ID>0</DISK_ID><SIZE>10240</SIZE></DISK>
<DISK><DISK_ID>1</DISK_ID><SIZE>512</SIZE></DISK>
<DISK><DISK_ID>2</DISK_ID></DISK>
</TEMPLATE></VM>"""


@pytest.mark.parametrize(("disk_id", "size"), [(0, 10240), (1, 512)])
def test_disk_size_from_vm_xml(disk_id: int, size: int) -> None:
    assert layout.disk_size_mb(VM_XML, disk_id) == size


@pytest.mark.parametrize(("xml", "disk_id"), [(VM_XML, 2), (VM_XML, 9), ("<VM><oops", 0)])
def test_disk_size_errors(xml: str, disk_id: int) -> None:
    with pytest.raises(ValidationError):
        layout.disk_size_mb(xml, disk_id)


# --- parsing of command output, capacity -------------------------------------------------------------------------

def test_parse_df_plain_numbers() -> None:
    out = b"Filesystem 1048576-blocks Used Available Capacity Mounted on\n/dev/vda 20029 2983 16006 16% /\n"
    assert parse_df(out) == (20029, 2983, 16006)


@pytest.mark.parametrize("out", [b"", b"Filesystem 1M-blocks Used\n", b"x 10M 2M 8M 20% /\n"])
def test_parse_df_refuses_garbage(out: bytes) -> None:
    with pytest.raises(DriverError):
        parse_df(out)


@pytest.mark.parametrize(
    ("limit", "capacity"),
    [(None, (1000, 700, 300)), (500, (500, 200, 300)), (250, (250, 0, 300)), (5000, (1000, 700, 300))],
)
def test_limit_mb(limit: int | None, capacity: tuple[int, int, int]) -> None:
    got = apply_limit(total=1000, used=300, free=700, limit_mb=limit)
    assert (got.total_mb, got.free_mb, got.used_mb) == capacity


def test_parse_stat_sums_apparent_and_allocated_bytes() -> None:
    assert parse_stat(b"67436544 2048 512\n1000 8 512\n", ["/a", "/b"]) == (67437544, 2048 * 512 + 8 * 512)
    with pytest.raises(DriverError):
        parse_stat(b"1 2 512\n", ["/a", "/b"])


TOTALS = {"disk.0.0": 1000, "disk.1.0": 500, "vm.xml": 10}


@pytest.mark.parametrize(("listing", "done"), [
    (b"", {"disk.0.0": 0, "disk.1.0": 0, "vm.xml": 0}),
    (b"400 .disk.0.0.Xa91bc\n", {"disk.0.0": 400, "disk.1.0": 0, "vm.xml": 0}),  # rsync's temporary name
    (b"1000 disk.0.0\n500 disk.1.0\n10 vm.xml\n", TOTALS),
    (b"9999 disk.0.0\n7 other\nbad line\n12 .vm.xml.Q1w2e3\n", {"disk.0.0": 1000, "disk.1.0": 0, "vm.xml": 10}),
])
def test_file_progress_maps_arrived_bytes_to_the_files(listing: bytes, done: dict[str, int]) -> None:
    assert file_progress(listing, TOTALS) == done


def test_parse_digests() -> None:
    a, b = "a" * 64, "B" * 64
    assert parse_digests(f"{a} */s/x\n{b} */s/y\n".encode(), ["/s/x", "/s/y"]) == {"/s/x": a, "/s/y": "b" * 64}
    with pytest.raises(DriverError, match="/s/y"):
        parse_digests(f"{a} */s/x\n".encode(), ["/s/x", "/s/y"])


# --- datastore attributes -------------------------------------------------------------------------------------

def rsync_ds(**attributes: str) -> Datastore:
    template = Template()
    for name, value in {"RSYNC_HOST": "backup.example", **attributes}.items():
        template.set(name, value)
    return Datastore(id=100, name="b", type=DatastoreType.BACKUP_DS, ds_mad="rsync", template=template)


@pytest.mark.parametrize(
    ("attributes", "options"),
    [({}, ["-aS", "-W"]), ({"RSYNC_ARGS": "-az --partial"}, ["-az", "--partial", "-W"]),
     ({"RSYNC_BWLIMIT": "10M"}, ["-aS", "-W", "--bwlimit=10M"]),
     ({"RSYNC_ARGS": "-aS --rsync-path='sudo rsync'"}, ["-aS", "--rsync-path=sudo rsync", "-W"])],
)
def test_rsync_options(attributes: dict[str, str], options: list[str]) -> None:
    assert rsync_options(rsync_ds(**attributes)) == options


@pytest.mark.parametrize(
    "attributes",
    [{"RSYNC_ARGS": "-aS /etc"}, {"RSYNC_ARGS": "-e sh"}, {"RSYNC_ARGS": "--rsh=sh"}, {"RSYNC_ARGS": "'-a"},
     {"RSYNC_BWLIMIT": "fast"}, {"RSYNC_BWLIMIT": "10;x"}],
)
def test_rsync_options_refused(attributes: dict[str, str]) -> None:
    with pytest.raises(ValidationError):
        rsync_options(rsync_ds(**attributes))


@pytest.mark.parametrize(
    ("attributes", "target"),
    [({}, ("backup.example", 22, "oneadmin")),
     ({"RSYNC_USER": "root", "RSYNC_PORT": "2222"}, ("backup.example", 2222, "root"))],
)
def test_server_target(attributes: dict[str, str], target: tuple[str, int, str]) -> None:
    got = server_target(rsync_ds(**attributes))
    assert (got.host, got.port, got.user) == target


@pytest.mark.parametrize(
    "attributes",
    [{"RSYNC_HOST": ""}, {"RSYNC_HOST": "-oProxyCommand"}, {"RSYNC_HOST": "h=x"}, {"RSYNC_HOST": "a b"}, {"RSYNC_PORT": "0"},
     {"RSYNC_PORT": "x"}, {"RSYNC_USER": "-l"}],
)
def test_server_target_refused(attributes: dict[str, str]) -> None:
    with pytest.raises(ValidationError):
        server_target(rsync_ds(**attributes))
