"""BACKUP_CONFIG / BACKUP_IDS semantics (scheduler/model/backup_config.py): spec §4.4, §6.1-6.3, §7.1, §10.5."""

from __future__ import annotations

from pathlib import Path

import pytest
from lxml import etree

from scheduler.errors import ValidationError
from scheduler.model import backup_config as backups
from scheduler.model.backup_config import (
    BACKUP_CONFIG_ORDER,
    READ_ONLY_KEYS,
    REFUSED_DISKS,
    REFUSED_SYSTEM_SNAPSHOTS,
    add_backup_id,
    backup_disk_ids,
    can_increment,
    default_backup_config,
    del_backup_id,
    increment_refusal,
    ordered_items,
    parse_backup_config,
    remove_last,
    reset_chain,
)
from scheduler.model.template import Template, Vector
from tests import xsd

VM_XSD = Path(__file__).resolve().parents[2] / "shared" / "reference" / "opennebula-7.0-xsd" / "vm.xsd"

CHAIN = {"INCREMENTAL_BACKUP_ID": "12", "LAST_INCREMENT_ID": "3"}
NO_CHAIN = {"INCREMENTAL_BACKUP_ID": "-1", "LAST_INCREMENT_ID": "-1"}


def parse(current: dict[str, str], user: dict[str, str] | None, *, capable: bool = True, append: bool = False):
    return parse_backup_config(
        Vector(current), None if user is None else Vector(user), can_increment=capable, append=append
    )


# ---- simple keys: defaults, coercions, append vs replace ------------------------------------------

SIMPLE_KEY_CASES = [
    # (current, user, append, key, expected value or None when absent)
    ({}, {"KEEP_LAST": "4"}, False, "KEEP_LAST", "4"),
    ({}, {"KEEP_LAST": "-3"}, False, "KEEP_LAST", "0"),
    ({}, {"KEEP_LAST": " 7 "}, False, "KEEP_LAST", "7"),
    ({}, {"KEEP_LAST": "+2"}, False, "KEEP_LAST", "2"),
    ({"KEEP_LAST": "4"}, {}, False, "KEEP_LAST", None),
    ({"KEEP_LAST": "4"}, {}, True, "KEEP_LAST", "4"),
    ({"KEEP_LAST": "4"}, {"KEEP_LAST": ""}, False, "KEEP_LAST", None),
    ({"KEEP_LAST": "4"}, {"KEEP_LAST": ""}, True, "KEEP_LAST", "4"),
    ({"KEEP_LAST": "4"}, {"KEEP_LAST": "9"}, True, "KEEP_LAST", "9"),
    ({}, {}, False, "BACKUP_VOLATILE", "NO"),
    ({}, {}, True, "BACKUP_VOLATILE", None),
    ({}, {"BACKUP_VOLATILE": "yes"}, False, "BACKUP_VOLATILE", "YES"),
    ({}, {"BACKUP_VOLATILE": "maybe"}, False, "BACKUP_VOLATILE", "NO"),
    ({"BACKUP_VOLATILE": "YES"}, {}, False, "BACKUP_VOLATILE", "NO"),
    ({"BACKUP_VOLATILE": "YES"}, {}, True, "BACKUP_VOLATILE", "YES"),
    ({"BACKUP_VOLATILE": "YES"}, {"BACKUP_VOLATILE": "no"}, True, "BACKUP_VOLATILE", "NO"),
    ({}, {}, False, "FS_FREEZE", "NONE"),
    ({}, {}, True, "FS_FREEZE", None),
    ({}, {"FS_FREEZE": "agent"}, False, "FS_FREEZE", "AGENT"),
    ({}, {"FS_FREEZE": "Suspend"}, False, "FS_FREEZE", "SUSPEND"),
    ({}, {"FS_FREEZE": "TRY"}, False, "FS_FREEZE", "NONE"),
    ({"FS_FREEZE": "AGENT"}, {}, False, "FS_FREEZE", "NONE"),
    ({"FS_FREEZE": "AGENT"}, {}, True, "FS_FREEZE", "AGENT"),
    ({"FS_FREEZE": "AGENT"}, {"FS_FREEZE": "bogus"}, True, "FS_FREEZE", "NONE"),
]


@pytest.mark.parametrize(("current", "user", "append", "key", "expected"), SIMPLE_KEY_CASES)
def test_simple_keys(current, user, append, key, expected):
    assert parse(current, user, append=append).get(key) == expected


@pytest.mark.parametrize("append", [False, True])
@pytest.mark.parametrize("value", ["abc", "4.5", "1e3", "0x10", "99999999999"])
def test_bad_keep_last_is_rejected_naming_attribute_and_value(value, append):
    with pytest.raises(ValidationError) as caught:
        parse({"KEEP_LAST": "4"}, {"KEEP_LAST": value}, append=append)
    assert "KEEP_LAST" in str(caught.value)
    assert repr(value) in str(caught.value)


def test_without_user_backup_config_nothing_changes():
    current = {"MODE": "INCREMENT", "KEEP_LAST": "3", **CHAIN}
    assert parse(current, None, capable=False) == Vector(current)


def test_input_vectors_are_not_modified():
    current, user = Vector({"KEEP_LAST": "2", **CHAIN}), Vector({"MODE": "FULL"})
    result = parse_backup_config(current, user, can_increment=True, append=False)
    assert current == Vector({"KEEP_LAST": "2", **CHAIN})
    assert user == Vector({"MODE": "FULL"})
    assert result is not current


def test_replace_of_empty_config_gives_the_defaults():
    assert parse({}, {}, capable=True) == Vector(
        {"BACKUP_VOLATILE": "NO", "FS_FREEZE": "NONE", "MODE": "FULL", "INCREMENT_MODE": "CBT", **NO_CHAIN}
    )
    assert default_backup_config() == Vector({"BACKUP_VOLATILE": "NO", "FS_FREEZE": "NONE", "MODE": "FULL", **NO_CHAIN})


# ---- read-only keys ------------------------------------------------------------------------------

STORED_READ_ONLY = {
    "LAST_DATASTORE_ID": "100",
    "LAST_BACKUP_ID": "abc123",
    "LAST_BACKUP_SIZE": "512",
    "LAST_BACKUP_FORMAT": "raw",
    "ACTIVE_FLATTEN": "NO",
    "BACKUP_JOB_ID": "5",
}


@pytest.mark.parametrize("append", [False, True])
def test_read_only_keys_come_from_current_never_from_user(append):
    user = {key: "666" for key in READ_ONLY_KEYS} | {"MODE": "INCREMENT", "UNKNOWN_KEY": "x"}
    current = {"MODE": "INCREMENT", **CHAIN, **STORED_READ_ONLY}
    result = parse(current, user, append=append)
    for key, value in {**CHAIN, **STORED_READ_ONLY}.items():
        assert result[key] == value, key
    assert "LAST_BRIDGE" not in result
    assert "UNKNOWN_KEY" not in result


def test_read_only_keys_cover_the_transient_and_chain_keys():
    assert {
        "LAST_DATASTORE_ID",
        "LAST_BACKUP_ID",
        "LAST_BACKUP_SIZE",
        "LAST_BACKUP_FORMAT",
        "INCREMENTAL_BACKUP_ID",
        "LAST_INCREMENT_ID",
        "ACTIVE_FLATTEN",
        "BACKUP_JOB_ID",
    } <= READ_ONLY_KEYS
    assert not READ_ONLY_KEYS & set(backups.USER_KEYS)


# ---- MODE, INCREMENT_MODE and chain pointers -------------------------------------------------------

MODE_CASES = [
    # (current, user, capable, append, expected subset, absent keys)
    # not capable: always FULL, no chain, no INCREMENT_MODE, whatever was asked
    (
        {"MODE": "INCREMENT", "INCREMENT_MODE": "SNAPSHOT", **CHAIN},
        {"MODE": "INCREMENT"},
        False,
        False,
        {"MODE": "FULL", **NO_CHAIN},
        ["INCREMENT_MODE"],
    ),
    (
        {"MODE": "INCREMENT", "INCREMENT_MODE": "CBT", **CHAIN},
        {},
        False,
        True,
        {"MODE": "FULL", **NO_CHAIN},
        ["INCREMENT_MODE"],
    ),
    # capable: anything but INCREMENT is FULL
    ({}, {"MODE": "increment"}, True, False, {"MODE": "INCREMENT", "INCREMENT_MODE": "CBT", **NO_CHAIN}, []),
    ({}, {"MODE": "DIFFERENTIAL"}, True, False, {"MODE": "FULL", "INCREMENT_MODE": "CBT", **NO_CHAIN}, []),
    ({}, {"MODE": "DIFFERENTIAL"}, True, True, {"MODE": "FULL", **NO_CHAIN}, ["INCREMENT_MODE"]),
    # chain kept only when old and new mode are both INCREMENT
    ({"MODE": "INCREMENT", **CHAIN}, {"MODE": "INCREMENT"}, True, False, {"MODE": "INCREMENT", **CHAIN}, []),
    ({"MODE": "increment", **CHAIN}, {"MODE": "INCREMENT"}, True, True, {"MODE": "INCREMENT", **CHAIN}, []),
    ({"MODE": "INCREMENT", **CHAIN}, {"MODE": "FULL"}, True, True, {"MODE": "FULL", **NO_CHAIN}, []),
    ({"MODE": "FULL", **CHAIN}, {"MODE": "INCREMENT"}, True, True, {"MODE": "INCREMENT", **NO_CHAIN}, []),
    ({**CHAIN}, {"MODE": "INCREMENT"}, True, True, {"MODE": "INCREMENT", **NO_CHAIN}, []),
    # replace without MODE: back to FULL, chain dropped
    (
        {"MODE": "INCREMENT", "INCREMENT_MODE": "SNAPSHOT", **CHAIN},
        {},
        True,
        False,
        {"MODE": "FULL", "INCREMENT_MODE": "CBT", **NO_CHAIN},
        [],
    ),
    # merge without MODE: mode, chain and INCREMENT_MODE untouched (even if INCREMENT_MODE is given)
    (
        {"MODE": "INCREMENT", "INCREMENT_MODE": "CBT", **CHAIN},
        {"KEEP_LAST": "2"},
        True,
        True,
        {"MODE": "INCREMENT", "INCREMENT_MODE": "CBT", **CHAIN},
        [],
    ),
    (
        {"MODE": "INCREMENT", "INCREMENT_MODE": "CBT", **CHAIN},
        {"INCREMENT_MODE": "SNAPSHOT"},
        True,
        True,
        {"MODE": "INCREMENT", "INCREMENT_MODE": "CBT", **CHAIN},
        [],
    ),
    ({}, {"INCREMENT_MODE": "SNAPSHOT"}, True, True, {}, ["MODE", "INCREMENT_MODE", "LAST_INCREMENT_ID"]),
    # INCREMENT_MODE: SNAPSHOT (any case) or CBT
    ({}, {"MODE": "INCREMENT", "INCREMENT_MODE": "snapshot"}, True, False, {"INCREMENT_MODE": "SNAPSHOT"}, []),
    ({}, {"MODE": "INCREMENT", "INCREMENT_MODE": "cbt"}, True, False, {"INCREMENT_MODE": "CBT"}, []),
    ({}, {"MODE": "INCREMENT", "INCREMENT_MODE": "DELTA"}, True, False, {"INCREMENT_MODE": "CBT"}, []),
    ({"INCREMENT_MODE": "SNAPSHOT"}, {"MODE": "INCREMENT"}, True, False, {"INCREMENT_MODE": "CBT"}, []),
    ({"INCREMENT_MODE": "SNAPSHOT"}, {"MODE": "INCREMENT"}, True, True, {"INCREMENT_MODE": "SNAPSHOT"}, []),
    # a change of INCREMENT_MODE ends the chain: checkpoints cannot continue overlays, nor the reverse
    ({"MODE": "INCREMENT", "INCREMENT_MODE": "CBT", **CHAIN}, {"MODE": "INCREMENT", "INCREMENT_MODE": "SNAPSHOT"},
     True, True, {"INCREMENT_MODE": "SNAPSHOT", **NO_CHAIN}, []),
    ({"MODE": "INCREMENT", "INCREMENT_MODE": "SNAPSHOT", **CHAIN}, {"MODE": "INCREMENT"}, True, False,
     {"INCREMENT_MODE": "CBT", **NO_CHAIN}, []),
    ({"MODE": "INCREMENT", "INCREMENT_MODE": "SNAPSHOT", **CHAIN}, {"MODE": "INCREMENT", "INCREMENT_MODE": "snapshot"},
     True, True, {"INCREMENT_MODE": "SNAPSHOT", **CHAIN}, []),
]


@pytest.mark.parametrize(("current", "user", "capable", "append", "expected", "absent"), MODE_CASES)
def test_mode_increment_mode_and_chain(current, user, capable, append, expected, absent):
    result = parse(current, user, capable=capable, append=append)
    assert {key: result.get(key) for key in expected} == expected
    for key in absent:
        assert key not in result, key


# ---- accessors -----------------------------------------------------------------------------------

ACCESSOR_CASES = [
    (backups.mode, {}, "FULL"),
    (backups.mode, {"MODE": "increment"}, "INCREMENT"),
    (backups.mode, {"MODE": "junk"}, "FULL"),
    (backups.fs_freeze, {}, "NONE"),
    (backups.fs_freeze, {"FS_FREEZE": "agent"}, "AGENT"),
    (backups.fs_freeze, {"FS_FREEZE": "TRY"}, "NONE"),
    (backups.increment_mode, {}, "CBT"),
    (backups.increment_mode, {"INCREMENT_MODE": "Snapshot"}, "SNAPSHOT"),
    (backups.backup_volatile, {}, False),
    (backups.backup_volatile, {"BACKUP_VOLATILE": "yes"}, True),
    (backups.active_flatten, {"ACTIVE_FLATTEN": "YES"}, True),
    (backups.active_flatten, {"ACTIVE_FLATTEN": "NO"}, False),
    (backups.keep_last, {}, None),
    (backups.keep_last, {"KEEP_LAST": "0"}, 0),
    (backups.keep_last, {"KEEP_LAST": "5"}, 5),
    (backups.keep_last, {"KEEP_LAST": "-2"}, 0),
    (backups.keep_last, {"KEEP_LAST": "x"}, None),
    (backups.incremental_backup_id, {}, -1),
    (backups.incremental_backup_id, CHAIN, 12),
    (backups.last_increment_id, {}, -1),
    (backups.last_increment_id, CHAIN, 3),
    (backups.backup_job_id, {}, None),
    (backups.backup_job_id, {"BACKUP_JOB_ID": "7"}, 7),
]


@pytest.mark.parametrize(("accessor", "config", "expected"), ACCESSOR_CASES)
def test_accessors(accessor, config, expected):
    assert accessor(Vector(config)) == expected


def test_reset_chain_returns_a_copy_with_both_pointers_at_minus_one():
    config = Vector({"MODE": "INCREMENT", "KEEP_LAST": "2", **CHAIN})
    result = reset_chain(config)
    assert result == Vector({"MODE": "INCREMENT", "KEEP_LAST": "2", **NO_CHAIN})
    assert config["LAST_INCREMENT_ID"] == "3"
    assert reset_chain(Vector()) == Vector(NO_CHAIN)


# ---- XML order -----------------------------------------------------------------------------------


def test_order_matches_the_vm_schema():
    xsd.require_schemas()
    schema = etree.parse(str(VM_XSD))
    ns = {"xs": "http://www.w3.org/2001/XMLSchema"}
    sequence = schema.xpath(
        "//xs:element[@name='BACKUP_CONFIG']/xs:complexType/xs:sequence/xs:element/@name", namespaces=ns
    )
    assert tuple(sequence) == BACKUP_CONFIG_ORDER


def test_ordered_items_puts_schema_keys_first_then_others_sorted():
    config = Vector({"ZZZ": "1", "MODE": "FULL", "ACTIVE_FLATTEN": "NO", "BACKUP_JOB_ID": "2", "KEEP_LAST": "3"})
    assert ordered_items(config) == [
        ("BACKUP_JOB_ID", "2"),
        ("KEEP_LAST", "3"),
        ("MODE", "FULL"),
        ("ACTIVE_FLATTEN", "NO"),
        ("ZZZ", "1"),
    ]


def test_ordered_items_of_parsed_text_template():
    template = Template.parse('BACKUP_CONFIG=[ MODE="INCREMENT", FS_FREEZE="agent", KEEP_LAST="2" ]')
    result = parse_backup_config(Vector(), template.get_vector("BACKUP_CONFIG"), can_increment=True, append=False)
    assert [key for key, _ in ordered_items(result)] == [
        "BACKUP_VOLATILE",
        "FS_FREEZE",
        "INCREMENTAL_BACKUP_ID",
        "INCREMENT_MODE",
        "KEEP_LAST",
        "LAST_INCREMENT_ID",
        "MODE",
    ]


# ---- disks: selection and increment eligibility ----------------------------------------------------


def disk(disk_id: int, kind: str = "FILE", fmt: str | None = "qcow2") -> Vector:
    values = {"DISK_ID": str(disk_id), "TYPE": kind}
    if fmt is not None:
        values["FORMAT"] = fmt
    return Vector(values)


SELECTION_CASES = [
    ([disk(2), disk(0), disk(1)], False, [0, 1, 2]),
    ([disk(0), disk(1, "SWAP", "raw"), disk(2, "CDROM", "raw"), disk(3, "RBD_CDROM", "raw")], False, [0]),
    ([disk(0), disk(1, "fs", "raw")], False, [0]),
    ([disk(0), disk(1, "FS", "raw")], True, [0, 1]),
    ([disk(0), disk(1, "SWAP", "raw")], True, [0]),
    ([disk(10, "RBD", "raw"), disk(3, "BLOCK", "raw")], False, [3, 10]),
    ([], False, []),
]


@pytest.mark.parametrize(("disks", "volatile", "expected"), SELECTION_CASES)
def test_backup_disk_ids(disks, volatile, expected):
    assert backup_disk_ids(disks, volatile) == expected


def test_disk_without_id_is_an_error():
    with pytest.raises(ValidationError, match="DISK_ID"):
        backup_disk_ids([Vector({"TYPE": "FILE"})], False)


ELIGIBILITY_CASES = [
    # (disks, system snapshots, volatile, disks with snapshots, refusal)
    ([disk(0), disk(1, fmt="QCOW2")], False, False, (), None),
    ([disk(0)], True, False, (), REFUSED_SYSTEM_SNAPSHOTS),
    ([disk(0, fmt="raw")], True, False, (), REFUSED_SYSTEM_SNAPSHOTS),
    ([disk(0), disk(1, fmt="raw")], False, False, (), REFUSED_DISKS),
    ([disk(0, fmt=None)], False, False, (), REFUSED_DISKS),
    ([disk(0), disk(1)], False, False, (1,), REFUSED_DISKS),
    ([disk(0), disk(1)], False, False, (7,), None),
    ([disk(0, "RBD", "raw")], False, False, (), None),
    ([disk(0, "RBD", "raw")], False, False, (0,), None),
    ([disk(0), disk(1, "SWAP", "raw")], False, False, (), None),
    ([disk(0), disk(1, "SWAP", "raw")], False, True, (), None),
    ([disk(0), disk(1, "CDROM", "raw")], False, False, (), None),
    ([disk(0), disk(1, "FS", "raw")], False, False, (), None),
    ([disk(0), disk(1, "FS", "raw")], False, True, (), REFUSED_DISKS),
    ([disk(0), disk(1, "FS", "qcow2")], False, True, (), None),
    ([disk(0), disk(1, "FS", "qcow2")], False, True, (1,), REFUSED_DISKS),
    ([], False, False, (), None),
]


@pytest.mark.parametrize(("disks", "system_snapshots", "volatile", "snapshotted", "refusal"), ELIGIBILITY_CASES)
def test_increment_eligibility(disks, system_snapshots, volatile, snapshotted, refusal):
    assert increment_refusal(disks, system_snapshots, volatile, snapshot_disk_ids=snapshotted) == refusal
    assert can_increment(disks, system_snapshots, volatile, snapshot_disk_ids=snapshotted) is (refusal is None)


def test_refusal_texts_match_opennebula():
    assert REFUSED_SYSTEM_SNAPSHOTS == "VM cannot use backup increment mode, it has snapshots."
    assert REFUSED_DISKS == "VM cannot use backup increment mode, it has disks snapshots or disks are not qcow2."


# ---- BACKUP_IDS and KEEP_LAST --------------------------------------------------------------------

REMOVE_LAST_CASES = [
    ([12, 15, 20], None, []),
    ([12, 15, 20], 0, []),
    ([12, 15, 20], -1, []),
    ([12, 15, 20], 3, []),
    ([12, 15, 20], 5, []),
    ([12, 15, 20], 2, [12]),
    ([12, 15, 20], 1, [12, 15]),
    ([20, 12, 15, 3], 2, [3, 12]),
    ([7, 7, 9], 1, [7]),
    ([], 2, []),
]


@pytest.mark.parametrize(("ids", "keep", "expected"), REMOVE_LAST_CASES)
def test_remove_last_picks_the_lowest_ids_beyond_keep_last(ids, keep, expected):
    assert remove_last(ids, keep) == expected


def test_remove_last_with_keep_last_read_from_config():
    assert remove_last([1, 2, 3, 4], backups.keep_last(Vector({"KEEP_LAST": "3"}))) == [1]
    assert remove_last([1, 2, 3, 4], backups.keep_last(Vector())) == []


ID_SET_CASES = [
    (add_backup_id, [12, 15], 13, [12, 13, 15]),
    (add_backup_id, [12, 15], 15, [12, 15]),
    (add_backup_id, [], 4, [4]),
    (del_backup_id, [12, 13, 15], 13, [12, 15]),
    (del_backup_id, [12, 15], 99, [12, 15]),
    (del_backup_id, [4], 4, []),
]


@pytest.mark.parametrize(("operation", "ids", "value", "expected"), ID_SET_CASES)
def test_backup_ids_are_a_sorted_set(operation, ids, value, expected):
    original = list(ids)
    assert operation(ids, value) == expected
    assert ids == original
