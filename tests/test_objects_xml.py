"""The object model's XML: valid against OpenNebula 7.0's XSDs, in schema order, and round-trips."""

from __future__ import annotations

import re

import pytest
from lxml import etree
from xmlschema.validators import XsdAnyElement

from scheduler.errors import ValidationError
from scheduler.model.objects import Datastore, History, Host, Image, Increment, User, Vm, pool_element, pool_xml
from scheduler.model.objects.common import BACKUP_IMAGE_PERMISSIONS, Ownership, Permissions
from scheduler.model.objects.datastore import BASE_PATH_ROOT
from scheduler.model.objects.states import (
    DatastoreType,
    HostState,
    ImageState,
    ImageType,
    LcmState,
    VmState,
    parse_code,
)
from scheduler.model.objects.user import LoginToken
from scheduler.model.objects.vm import (
    BACKUP_CONFIG_KEYS,
    MONITORING_SLOTS,
    SCHED_ACTION_KEYS,
    SHORT_TEMPLATE_SLOTS,
    SHORT_USER_TEMPLATE_SLOTS,
    TEMPLATE_SLOTS,
    split_vm_template,
)
from scheduler.model.template import Template, Vector
from tests.xsd import compiled, require_schemas, validate

# ---- sample objects -----------------------------------------------------------------------------


def typical_vm_template() -> Template:
    return Template.parse(
        """
        CPU = 1
        MEMORY = 2048
        VCPU = 2
        DISK = [ DISK_ID = 0, IMAGE_ID = 3, TARGET = vda, FORMAT = qcow2, TYPE = FILE, SIZE = 10240,
                 TM_MAD = qcow2, SOURCE = "/var/lib/vmsched/datastores/1/abc" ]
        DISK = [ DISK_ID = 1, IMAGE_ID = 4, TARGET = vdb, FORMAT = qcow2, TYPE = FILE ]
        NIC = [ NIC_ID = 0, NETWORK_ID = 0, IP = "10.0.0.5", MAC = "02:00:0a:00:00:05", BRIDGE = br0 ]
        OS = [ ARCH = x86_64, UUID = "6f1c5e2a-1b2c-4d3e-8f90-123456789abc" ]
        CONTEXT = [ NETWORK = YES, SSH_PUBLIC_KEY = "ssh-ed25519 AAAA & <key>" ]
        GRAPHICS = [ TYPE = VNC, LISTEN = "0.0.0.0" ]
        TM_MAD_SYSTEM = ssh
        """
    )


def backup_config() -> Vector:
    return Vector(
        {
            "MODE": "INCREMENT",
            "KEEP_LAST": "4",
            "FS_FREEZE": "AGENT",
            "BACKUP_VOLATILE": "NO",
            "INCREMENT_MODE": "CBT",
            "INCREMENTAL_BACKUP_ID": "12",
            "LAST_INCREMENT_ID": "3",
            "BACKUP_JOB_ID": "1",
        }
    )


def sched_action(action_id: int = 7) -> Vector:
    return Vector({"ID": str(action_id), "ACTION": "backup", "ARGS": "100,0", "TIME": "1700000000", "REPEAT": "0"})


def vm_minimal() -> Vm:
    return Vm(0, "empty")


def vm_typical() -> Vm:
    return Vm(
        42,
        "web-42",
        ownership=Ownership(2, 1, "alice", "users"),
        state=VmState.ACTIVE,
        lcm_state=LcmState.RUNNING,
        prev_state=VmState.ACTIVE,
        prev_lcm_state=LcmState.BACKUP,
        last_poll=1700000100,
        stime=1700000000,
        deploy_id="one-42",
        monitoring=Template.parse("CPU = 1.5\nMEMORY = 524288\nGUEST_IP = 10.0.0.5\nTIMESTAMP = 1700000100"),
        sched_actions=[9, 7],
        template=typical_vm_template(),
        user_template=Template.parse('LABELS = "prod"\nSCHED_MESSAGE = "waiting: host limit"\nOWNER_NOTE = x'),
        history=[
            History(0, "kvm1", 2, ds_id=0, stime=1700000000, etime=1700000050, action=30),
            History(1, "kvm2", 3, ds_id=100, stime=1700000050, action=50, tm_mad="qcow2"),
        ],
        backup_config=backup_config(),
        backup_ids=[15, 12],
    )


def host_typical() -> Host:
    return Host(
        3,
        "kvm2",
        state=HostState.MONITORED,
        prev_state=HostState.MONITORING_MONITORED,
        vms=[42, 7],
        template=Template.parse("SSH_HOST = 10.0.0.2\nSSH_PORT = 2222\nSSH_USER = root\nLIBVIRT_URI = qemu:///system"),
        monitored_at=1700000000,
    )


def backup_datastore() -> Datastore:
    return Datastore(
        100,
        "restic-backups",
        type=DatastoreType.BACKUP_DS,
        ds_mad="restic",
        total_mb=1000,
        free_mb=600,
        used_mb=400,
        images=[12, 15],
        template=Template.parse(
            'RESTIC_PASSWORD = "s3cret"\nRESTIC_SFTP_SERVER = backup1\nRESTIC_SFTP_USER = vmsched\nTYPE = BACKUP_DS'
        ),
    )


def backup_image() -> Image:
    return Image(
        12,
        "42 01-Dec 13.36.56",
        ownership=Ownership(2, 1, "alice", "users"),
        permissions=BACKUP_IMAGE_PERMISSIONS,
        type=ImageType.BACKUP,
        state=ImageState.READY,
        regtime=1700000100,
        source="f3a9c1",
        size=1536,
        datastore_id=100,
        datastore="restic-backups",
        vms=[42],
        template=Template.parse("BACKUP_JOB_ID = 1"),
        increments=[
            Increment(0, "FULL", -1, "f3a9c1", 1024, 1700000100),
            Increment(1, "INCREMENT", 0, "77b0e2", 512, 1700086500),
        ],
        backup_disk_ids=[0, 1],
    )


def user_typical() -> User:
    return User(
        2,
        "alice",
        gid=1,
        gname="users",
        groups=[1, 105],
        password="4f2e...hash",
        login_tokens=[LoginToken("tok-abc", 1700003600, -1)],
        template=Template.parse('EMAIL = "alice@example.org"'),
    )


SAMPLES = [
    pytest.param(lambda: Host(0, "kvm0"), "host", id="host-empty"),
    pytest.param(host_typical, "host", id="host-typical"),
    pytest.param(lambda: Datastore(1, "default"), "datastore", id="datastore-empty"),
    pytest.param(backup_datastore, "datastore", id="datastore-backup"),
    pytest.param(lambda: Image(0, "plain"), "image", id="image-empty"),
    pytest.param(backup_image, "image", id="image-backup"),
    pytest.param(vm_minimal, "vm", id="vm-minimal"),
    pytest.param(vm_typical, "vm", id="vm-typical"),
    pytest.param(lambda: User(0, "oneadmin"), "user", id="user-empty"),
    pytest.param(user_typical, "user", id="user-typical"),
]


# ---- validity against the XSDs ------------------------------------------------------------------


@pytest.mark.parametrize(("make", "schema"), SAMPLES)
def test_object_validates_against_its_schema(make, schema):
    validate(make().to_element(), schema)


@pytest.mark.parametrize(("make", "schema"), SAMPLES)
def test_pool_of_two_validates_against_pool_schema(make, schema):
    objects = [make(), make()]
    validate(pool_element(schema, objects), f"{schema}_pool")


@pytest.mark.parametrize("schema", ["host", "datastore", "image", "vm", "user"])
def test_empty_pool_validates(schema):
    validate(pool_element(schema, []), f"{schema}_pool")


@pytest.mark.parametrize("make", [vm_minimal, vm_typical])
def test_vm_short_body_validates_against_vm_pool(make):
    vm = make()
    validate(etree.fromstring(f"<VM_POOL>{vm.short_xml()}</VM_POOL>"), "vm_pool")
    validate(pool_element("vm", [vm]), "vm_pool")


def test_vm_extended_pool_with_sched_actions_validates():
    pool = pool_element("vm", [vm_typical(), vm_minimal()], extended=True, sched_actions={42: [sched_action()]})
    validate(pool, "vm_pool_extended")
    assert len(pool.findall("VM[ID='42']/TEMPLATE/SCHED_ACTION")) == 1
    assert pool.findall("VM[ID='0']/TEMPLATE/SCHED_ACTION") == []


def test_vm_with_sched_actions_validates():
    vm = vm_typical()
    validate(vm.to_element(sched_actions=[sched_action(7), sched_action(9)]), "vm")


def test_validator_rejects_an_empty_integer():
    require_schemas()
    element = Host(0, "kvm0").to_element()
    element.find("CLUSTER_ID").text = ""
    with pytest.raises(AssertionError, match="CLUSTER_ID"):
        validate(element, "host")


def test_require_schemas_skips_with_reason_when_folder_is_missing(monkeypatch, tmp_path):
    import tests.xsd as xsd

    monkeypatch.setattr(xsd, "SCHEMA_DIR", tmp_path / "absent")
    with pytest.raises(pytest.skip.Exception, match="XSDs not found"):
        xsd.require_schemas()


# ---- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize(("make", "schema"), SAMPLES)
def test_round_trip(make, schema):
    obj = make()
    opts = {"show_secrets": True} if schema in ("datastore", "user") else {}
    assert type(obj).from_element(obj.to_element(**opts)) == obj


def test_vm_round_trip_ignores_injected_sched_actions():
    vm = vm_typical()
    assert Vm.from_element(vm.to_element(sched_actions=[sched_action()])) == vm


def test_vm_from_short_body_keeps_listed_fields():
    vm = vm_typical()
    back = Vm.from_element(vm.to_element(extended=False))
    assert (back.id, back.name, back.state, back.lcm_state, back.deploy_id) == (42, "web-42", 3, 3, "one-42")
    assert back.host == (3, "kvm2")
    assert len(back.template.vectors("DISK")) == 2
    assert back.backup_ids == []  # the short body carries no BACKUPS


def test_round_trip_through_text():
    vm = vm_typical()
    assert Vm.from_element(etree.fromstring(vm.to_xml())) == vm


# ---- integers are never empty -------------------------------------------------------------------

INTEGER_TAGS = {
    "ID", "UID", "GID", "STATE", "LCM_STATE", "PREV_STATE", "PREV_LCM_STATE", "LAST_POLL", "RESCHED", "STIME",
    "ETIME", "SEQ", "HID", "CID", "DS_ID", "ACTION", "TYPE", "DISK_TYPE", "SIZE", "REGTIME", "MODTIME",
    "PERSISTENT", "RUNNING_VMS", "DATASTORE_ID", "CLUSTER_ID", "TOTAL_MB", "FREE_MB", "USED_MB", "ENABLED",
    "OWNER_U", "OTHER_A", "PARENT_ID", "DATE", "CURRENT_BASE", "MEM_USAGE", "DISK_USAGE",
}  # fmt: skip
_INTEGER = re.compile(r"-?\d+")


@pytest.mark.parametrize(("make", "schema"), SAMPLES)
def test_integer_elements_always_hold_a_number(make, schema):
    element = make().to_element()
    checked = 0
    for child in element.iter(*INTEGER_TAGS):
        if child.getparent().tag in ("TEMPLATE", "USER_TEMPLATE", "DISK", "NIC", "GRAPHICS", "OS", "CONTEXT"):
            continue  # free-form template values, not schema integers
        if child.tag in ("TYPE", "ACTION") and not (child.text or "").lstrip("-").isdigit():
            continue  # INCREMENT/TYPE and SCHED_ACTION/ACTION are strings
        assert _INTEGER.fullmatch(child.text or ""), f"{schema} {child.getroottree().getpath(child)} is empty"
        checked += 1
    assert checked >= 3


def test_pyone_reads_our_xml():
    bindings = pytest.importorskip("pyone.bindings")
    vm = bindings.parseString(vm_typical().to_xml(sched_actions=[sched_action()]).encode())
    assert (vm.ID, vm.STATE, vm.LCM_STATE) == (42, 3, 3)
    assert vm.BACKUPS.BACKUP_CONFIG.MODE == "INCREMENT"
    assert vm.BACKUPS.BACKUP_IDS.ID == [12, 15]
    assert vm.HISTORY_RECORDS.HISTORY[-1].HOSTNAME == "kvm2"
    image = bindings.parseString(backup_image().to_xml().encode())
    assert [i.SOURCE for i in image.BACKUP_INCREMENTS.INCREMENT] == ["f3a9c1", "77b0e2"]
    pool = bindings.parseString(pool_xml("vm", [vm_typical(), vm_minimal()]).encode())
    assert [v.ID for v in pool.VM] == [42, 0]


# ---- element order ------------------------------------------------------------------------------


def _children(element: etree._Element) -> list[str]:
    return [child.tag for child in element]


def test_sched_action_comes_last_in_vm_template_with_schema_key_order():
    element = vm_typical().to_element(sched_actions=[sched_action(7), sched_action(9)])
    tags = _children(element.find("TEMPLATE"))
    assert tags[-2:] == ["SCHED_ACTION", "SCHED_ACTION"]
    first = element.find("TEMPLATE/SCHED_ACTION")
    assert tuple(_children(first)) == SCHED_ACTION_KEYS
    assert (first.findtext("PARENT_ID"), first.findtext("DONE"), first.findtext("REPEAT")) == ("42", "-1", "0")


def test_sched_action_without_time_is_refused():
    with pytest.raises(ValidationError, match="SCHED_ACTION of VM 42 has no TIME"):
        vm_typical().to_element(sched_actions=[Vector({"ID": "1", "ACTION": "backup"})])


def test_vm_template_follows_schema_order_not_alphabetical():
    tags = _children(vm_typical().to_element().find("TEMPLATE"))
    assert tags == [
        "CONTEXT", "CPU", "DISK", "DISK", "GRAPHICS", "MEMORY", "NIC", "OS", "TM_MAD_SYSTEM", "VCPU", "VMID",
    ]  # fmt: skip
    video = Vm(1, "v", template=Template.parse("VIDEO = [ VRAM = 16, TYPE = virtio, RESOLUTION = 1280x720 ]"))
    assert _children(video.to_element().find("TEMPLATE/VIDEO")) == ["TYPE", "VRAM", "RESOLUTION"]


def test_backup_config_written_in_schema_order_and_unknown_keys_left_out():
    vm = vm_typical()
    vm.backup_config["ACTIVE_FLATTEN"] = "NO"
    tags = _children(vm.to_element().find("BACKUPS/BACKUP_CONFIG"))
    assert tags == [key for key in BACKUP_CONFIG_KEYS if key in vm.backup_config]
    assert "ACTIVE_FLATTEN" not in tags


def test_storage_form_keeps_every_backup_config_key():
    vm = vm_typical()
    vm.backup_config["ACTIVE_FLATTEN"] = "YES"
    vm.backup_config["LAST_BACKUP_FORMAT"] = "rbd"
    stored = vm.to_element(storage=True)
    assert _children(stored.find("BACKUPS/BACKUP_CONFIG"))[-2:] == ["ACTIVE_FLATTEN", "LAST_BACKUP_FORMAT"]
    assert Vm.from_element(etree.fromstring(vm.to_xml(storage=True))) == vm
    assert Vm.from_element(vm.to_element()) != vm  # the client form leaves them out


def test_empty_backup_config_is_an_empty_element():
    backups = vm_minimal().to_element().find("BACKUPS")
    assert etree.tostring(backups) == b"<BACKUPS><BACKUP_CONFIG/><BACKUP_IDS/></BACKUPS>"


def test_monitoring_writes_declared_names_first():
    vm = Vm(1, "m", monitoring=Template.parse("ALPHA = 1\nTIMESTAMP = 5\nCPU = 2.5\nDISK_SIZE = [ ID = 0, SIZE = 3 ]"))
    element = vm.to_element()
    assert _children(element.find("MONITORING")) == ["CPU", "DISK_SIZE", "TIMESTAMP", "ALPHA"]
    validate(element, "vm")


def test_short_user_template_writes_declared_names_first():
    vm = Vm(1, "u", user_template=Template.parse("A_NOTE = x\nSCHED_MESSAGE = waiting\nLABELS = prod"))
    element = vm.to_element(extended=False)
    assert _children(element.find("USER_TEMPLATE")) == ["LABELS", "SCHED_MESSAGE", "A_NOTE"]
    validate(etree.fromstring(f"<VM_POOL>{vm.short_xml()}</VM_POOL>"), "vm_pool")


def test_stray_template_attributes_are_rendered_in_user_template():
    vm = Vm(1, "s", template=Template.parse("CPU = 1\nCPU = 2\nFOO = bar\nMEMORY = [ SIZE = 1 ]"))
    element = vm.to_element()
    validate(element, "vm")
    assert element.findtext("TEMPLATE/CPU") == "1"
    assert [e.tag for e in element.find("USER_TEMPLATE")] == ["CPU", "FOO", "MEMORY"]


def test_values_are_escaped_in_both_bodies():
    vm = vm_typical()
    vm.name = 'a<b & "c">'
    for element in (vm.to_element(), vm.to_element(extended=False)):
        assert element.findtext("NAME") == 'a<b & "c">'
    assert etree.fromstring(vm.short_xml()).findtext("TEMPLATE/DISK/SOURCE") == "/var/lib/vmsched/datastores/1/abc"


# ---- the hard-coded schema tables match vm.xsd / vm_pool.xsd ------------------------------------


def _child_decl(element, name):
    return next(e for e in element.type.content.iter_elements() if getattr(e, "local_name", None) == name)


def _declared_names(element) -> list[str]:
    return [e.local_name for e in element.type.content.iter_elements() if not isinstance(e, XsdAnyElement)]


def test_tables_match_the_schemas():
    require_schemas()
    vm = compiled("vm").elements["VM"]
    assert _declared_names(_child_decl(vm, "TEMPLATE")) == list(TEMPLATE_SLOTS)
    assert _declared_names(_child_decl(vm, "MONITORING")) == list(MONITORING_SLOTS)
    assert _declared_names(_child_decl(_child_decl(vm, "BACKUPS"), "BACKUP_CONFIG")) == list(BACKUP_CONFIG_KEYS)
    sched = _child_decl(_child_decl(vm, "TEMPLATE"), "SCHED_ACTION")
    assert _declared_names(sched) == list(SCHED_ACTION_KEYS)
    short = _child_decl(compiled("vm_pool").elements["VM_POOL"], "VM")
    assert _declared_names(_child_decl(short, "TEMPLATE")) == list(SHORT_TEMPLATE_SLOTS)
    assert _declared_names(_child_decl(short, "USER_TEMPLATE")) == list(SHORT_USER_TEMPLATE_SLOTS)


# ---- split_vm_template --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "template", "user"),
    [
        ("", "", ""),
        ("NAME = web", "", ""),
        ("CPU = 1\nMEMORY = 512", "CPU = 1\nMEMORY = 512", ""),
        ("LABELS = prod\nFOO = [ A = 1 ]", "", "FOO = [ A = 1 ]\nLABELS = prod"),
        ("DISK = [ IMAGE_ID = 1 ]\nDISK = [ IMAGE_ID = 2 ]", "DISK = [ IMAGE_ID = 1 ]\nDISK = [ IMAGE_ID = 2 ]", ""),
        ("DISK = vda", "", "DISK = vda"),  # a DISK must be a vector
        ("CPU = [ MODEL = host ]", "", "CPU = [ MODEL = host ]"),  # CPU must be a single value
        ("CPU = 1\nCPU = 2", "CPU = 1", "CPU = 2"),  # listed once: the extra one is the user's
        ("OS = [ ARCH = x86_64 ]\nCONTEXT = yes", "OS = [ ARCH = x86_64 ]\nCONTEXT = yes", ""),  # any shape
        ("TPM = [ MODEL = tpm-crb ]", "TPM = [ MODEL = tpm-crb ]", ""),
        ("TPM = [ VERSION = 2 ]", "", "TPM = [ VERSION = 2 ]"),  # closed vector, MODEL required
        ("VIDEO = [ TYPE = virtio, VRAM = big ]", "", "VIDEO = [ TYPE = virtio, VRAM = big ]"),  # VRAM integer
        ("SCHED_ACTION = [ ACTION = backup, TIME = +60 ]\nVMID = 9", "", ""),  # consumed by the core
        ("NIC_ALIAS = [ ALIAS_ID = 0, PARENT = NIC0, PARENT_ID = 0, IP = 1 ]", "NIC_ALIAS = [ ALIAS_ID = 0, PARENT = NIC0, PARENT_ID = 0, IP = 1 ]", ""),
        ("NIC_ALIAS = [ PARENT = NIC0 ]", "", "NIC_ALIAS = [ PARENT = NIC0 ]"),
    ],
)  # fmt: skip
def test_split_vm_template(text, template, user):
    kept, rest = split_vm_template(Template.parse(text))
    assert kept == Template.parse(template)
    assert rest == Template.parse(user)
    validate(Vm(5, "t", template=kept, user_template=rest).to_element(), "vm")


def test_split_copies_vectors():
    source = Template.parse("DISK = [ IMAGE_ID = 1 ]")
    kept, _ = split_vm_template(source)
    kept.get_vector("DISK")["IMAGE_ID"] = "2"
    assert source.get_vector("DISK")["IMAGE_ID"] == "1"


# ---- kind-specific behaviour --------------------------------------------------------------------


def test_vm_host_and_uuid():
    assert vm_minimal().host is None
    assert vm_typical().host == (3, "kvm2")
    assert vm_typical().uuid == "6f1c5e2a-1b2c-4d3e-8f90-123456789abc"
    vm = vm_minimal()
    assert vm.uuid is None
    vm.uuid = "abc"
    assert vm.template.get_vector("OS") == Vector({"UUID": "abc"})


def test_vm_short_history_is_the_current_one():
    records = vm_typical().to_element(extended=False).find("HISTORY_RECORDS")
    assert [h.findtext("SEQ") for h in records] == ["1"]
    assert [h.findtext("SEQ") for h in vm_typical().to_element().find("HISTORY_RECORDS")] == ["0", "1"]


def test_backup_datastore_masks_secrets_unless_asked():
    ds = backup_datastore()
    assert ds.to_element().findtext("TEMPLATE/RESTIC_PASSWORD") == "****"
    assert ds.to_element(show_secrets=True).findtext("TEMPLATE/RESTIC_PASSWORD") == "s3cret"
    assert ds.to_element().findtext("TEMPLATE/RESTIC_SFTP_SERVER") == "backup1"
    assert ds.template.get("RESTIC_PASSWORD") == "s3cret"  # masking works on a copy
    assert ds.to_element().findtext("TM_MAD") == "-"


@pytest.mark.parametrize(
    ("template", "expected"),
    [("", f"{BASE_PATH_ROOT}/100"), ("BASE_PATH = /srv/backups", "/srv/backups")],
)
def test_datastore_base_path(template, expected):
    ds = Datastore(100, "b", type=DatastoreType.BACKUP_DS, ds_mad="rsync", template=Template.parse(template))
    assert ds.base_path == expected
    assert ds.to_element().findtext("BASE_PATH") == expected


def test_backup_image_fields():
    element = backup_image().to_element()
    assert element.findtext("TYPE") == "6"
    assert element.findtext("RUNNING_VMS") == "1"
    assert Permissions.from_element(element.find("PERMISSIONS")).octal() == "600"
    increments = element.findall("BACKUP_INCREMENTS/INCREMENT")
    assert [(i.findtext("ID"), i.findtext("TYPE"), i.findtext("PARENT_ID")) for i in increments] == [
        ("0", "FULL", "-1"),
        ("1", "INCREMENT", "0"),
    ]
    assert [e.text for e in element.find("BACKUP_DISK_IDS")] == ["0", "1"]
    assert Image(1, "os").to_element().find("BACKUP_DISK_IDS") is None


def test_user_hides_password_and_tokens_unless_asked():
    user = user_typical()
    hidden = user.to_element()
    assert hidden.findtext("PASSWORD") == ""
    assert hidden.findtext("LOGIN_TOKEN/TOKEN") == "****"
    assert hidden.findtext("LOGIN_TOKEN/EXPIRATION_TIME") == "1700003600"
    shown = user.to_element(show_secrets=True)
    assert (shown.findtext("PASSWORD"), shown.findtext("LOGIN_TOKEN/TOKEN")) == ("4f2e...hash", "tok-abc")
    assert [e.text for e in shown.find("GROUPS")] == ["1", "105"]
    pool = pool_element("user", [user], show_secrets=False)
    assert pool.findtext("USER/PASSWORD") == ""
    assert pool.find("DEFAULT_USER_QUOTAS") is not None


def test_unknown_pool_kind():
    with pytest.raises(ValidationError, match="unknown pool kind 'cluster'"):
        pool_element("cluster", [])


# ---- permissions and codes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("octal", "symbolic"),
    [("640", "um-u-----"), ("600", "um-------"), ("777", "umaumauma"), ("000", "---------"), ("154", "--au-au--")],
)  # fmt: skip
def test_permissions_octal(octal, symbolic):
    permissions = Permissions.from_octal(octal)
    assert (permissions.symbolic(), permissions.octal()) == (symbolic, octal)
    assert Permissions.from_element(permissions.to_element()) == permissions


@pytest.mark.parametrize(("umask", "octal"), [("177", "600"), ("0177", "600"), ("137", "640"), ("0", "777")])
def test_permissions_from_umask(umask, octal):
    assert Permissions.from_umask(umask).octal() == octal


@pytest.mark.parametrize("bad", ["64", "6400", "680", "abc", ""])
def test_permissions_refuse_bad_octal(bad):
    with pytest.raises(ValidationError, match="three octal digits"):
        Permissions.from_octal(bad)


@pytest.mark.parametrize(
    ("kind", "value", "expected"),
    [
        (DatastoreType, "BACKUP_DS", DatastoreType.BACKUP_DS),
        (DatastoreType, "backup_ds", DatastoreType.BACKUP_DS),
        (DatastoreType, "3", DatastoreType.BACKUP_DS),
        (DatastoreType, 3, DatastoreType.BACKUP_DS),
        (DatastoreType, DatastoreType.SYSTEM_DS, DatastoreType.SYSTEM_DS),
        (ImageType, "BACKUP", ImageType.BACKUP),
        (ImageState, " 1 ", ImageState.READY),
        (LcmState, "BACKUP_POWEROFF", LcmState.BACKUP_POWEROFF),
        (LcmState, 71, LcmState.RESTORE),
        (HostState, "OFFLINE", HostState.OFFLINE),
        (VmState, "poweroff", VmState.POWEROFF),
    ],
)
def test_parse_code(kind, value, expected):
    assert parse_code(kind, value) is expected


@pytest.mark.parametrize(
    ("kind", "value", "message"),
    [
        (DatastoreType, "NFS_DS", r"datastore TYPE 'NFS_DS' is not valid; expected one of: IMAGE_DS \(0\)"),
        (DatastoreType, "7", r"datastore TYPE '7' is not valid.*BACKUP_DS \(3\)"),
        (VmState, 7, r"VM STATE 7 is not valid"),  # 7 is unused by OpenNebula
        (ImageType, True, r"image TYPE True is not valid"),
        (ImageState, None, r"image STATE None is not valid"),
        (HostState, "", r"host STATE '' is not valid"),
    ],
)
def test_parse_code_refuses(kind, value, message):
    with pytest.raises(ValidationError, match=message):
        parse_code(kind, value)
