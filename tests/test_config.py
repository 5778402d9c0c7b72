"""sched.conf: schema, defaults, typed values and the problems reported for bad files."""

from __future__ import annotations

import dataclasses
import logging
from operator import attrgetter
from pathlib import Path, PurePosixPath
from zoneinfo import ZoneInfo

import pytest

from scheduler.config import (
    Config,
    DbConfig,
    LogConfig,
    SshConfig,
    describe_schema,
    load_config,
    parse_config,
)
from scheduler.errors import ConfigError, TemplateError
from scheduler.model.template import Template, Vector

EXAMPLE = Path(__file__).resolve().parent.parent / "sched.conf.example"
TOP_KEYS = (
    "BACKUP_BASE_PATH, DATASTORE_CAPACITY_CHECK, DB, DRAIN_TIME, LISTEN, LOG, MAX_BACKUPS, "
    "MAX_BACKUPS_DATASTORE, MAX_BACKUPS_HOST, MESSAGE_SIZE, MISSED_RUNS, MONITORING_INTERVAL_DATASTORE, "
    "MONITORING_INTERVAL_HOST, RETRY, SESSION_CACHE_TTL, SSH, TIMEZONE"
)
DURATION = "(or with a unit: 90s, 5m, 2h, 1d)"


def problems_of(text: str, source: str = "s.conf") -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source)
    return caught.value.problems


# ---- defaults -----------------------------------------------------------------------------------

DEFAULTS = [
    ("max_backups", 5),
    ("max_backups_host", 2),
    ("max_backups_datastore", 0),
    ("datastore_capacity_check", True),
    ("backup_base_path", PurePosixPath("/var/tmp/vmsched")),
    ("timezone", "UTC"),
    ("missed_runs", "ONCE"),
    ("retry.max", 3),
    ("retry.backoff", 60),
    ("drain_time", 60),
    ("monitoring_interval_host", 60),
    ("monitoring_interval_datastore", 300),
    ("listen.address", "127.0.0.1"),
    ("listen.port", 2633),
    ("listen.unix_socket", None),
    ("message_size", 1073741824),
    ("session_cache_ttl", 300),
    ("db.path", None),
    ("log.system", "stderr"),
    ("log.file", None),
    ("log.debug_level", 2),
    ("ssh.known_hosts", None),
    ("ssh.key", None),
    ("ssh.connect_timeout", 10),
    ("ssh.keepalive", 30),
]


@pytest.mark.parametrize(("attribute", "expected"), DEFAULTS)
def test_defaults(attribute: str, expected: object) -> None:
    assert attrgetter(attribute)(Config.defaults()) == expected


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n   # another\n"])
def test_empty_file_gives_the_defaults(text: str) -> None:
    assert parse_config(text, "s.conf") == Config.defaults()


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config.defaults().max_backups = 1  # type: ignore[misc]


# ---- good values --------------------------------------------------------------------------------

GOOD = [
    ("MAX_BACKUPS = 0", "max_backups", 0),
    ("MAX_BACKUPS = 12", "max_backups", 12),
    ('MAX_BACKUPS_HOST = " 4 "', "max_backups_host", 4),
    ("max_backups_datastore = 3", "max_backups_datastore", 3),
    ("DATASTORE_CAPACITY_CHECK = NO", "datastore_capacity_check", False),
    ("DATASTORE_CAPACITY_CHECK = yes", "datastore_capacity_check", True),
    ('BACKUP_BASE_PATH = "/srv/stage"', "backup_base_path", PurePosixPath("/srv/stage")),
    ("TIMEZONE = Europe/Paris", "timezone", "Europe/Paris"),
    ("MISSED_RUNS = skip", "missed_runs", "SKIP"),
    ("MISSED_RUNS = ALL", "missed_runs", "ALL"),
    ("DRAIN_TIME = 0", "drain_time", 0),
    ("DRAIN_TIME = 90s", "drain_time", 90),
    ("DRAIN_TIME = 5m", "drain_time", 300),
    ("DRAIN_TIME = 2H", "drain_time", 7200),
    ("MONITORING_INTERVAL_DATASTORE = 1d", "monitoring_interval_datastore", 86400),
    ("MESSAGE_SIZE = 65536", "message_size", 65536),
    ("SESSION_CACHE_TTL = 0", "session_cache_ttl", 0),
    ("RETRY = [ MAX = 0, BACKOFF = 2m ]", "retry.max", 0),
    ("RETRY = [ MAX = 0, BACKOFF = 2m ]", "retry.backoff", 120),
    ('LISTEN = [ ADDRESS = "0.0.0.0", PORT = "2634" ]', "listen.address", "0.0.0.0"),
    ('LISTEN = [ ADDRESS = "0.0.0.0", PORT = "2634" ]', "listen.port", 2634),
    ('LISTEN = [ ADDRESS = "0.0.0.0", PORT = "2634" ]', "listen.unix_socket", None),
    ('LISTEN = [ ADDRESS = "::1" ]', "listen.address", "::1"),
    ('LISTEN = [ ADDRESS = "sched.example.org" ]', "listen.address", "sched.example.org"),
    ('LISTEN = [ ADDRESS = "", UNIX_SOCKET = "/run/vmsched/api.sock" ]', "listen.address", ""),
    (
        'LISTEN = [ ADDRESS = "", UNIX_SOCKET = "/run/vmsched/api.sock" ]',
        "listen.unix_socket",
        Path("/run/vmsched/api.sock"),
    ),
    ("LISTEN = [ ]", "listen.port", 2633),
    ('DB = [ PATH = "/var/lib/other.db" ]', "db.path", Path("/var/lib/other.db")),
    ('LOG = [ SYSTEM = "file", FILE = "/var/log/vmsched.log" ]', "log.file", Path("/var/log/vmsched.log")),
    ("LOG = [ SYSTEM = JOURNALD, DEBUG_LEVEL = 3 ]", "log.system", "journald"),
    ("LOG = [ SYSTEM = JOURNALD, DEBUG_LEVEL = 3 ]", "log.debug_level", 3),
    ('SSH = [ KNOWN_HOSTS = "/etc/vmsched/known_hosts" ]', "ssh.known_hosts", Path("/etc/vmsched/known_hosts")),
    ('SSH = [ KEY = "/etc/vmsched/id_ed25519", KEEPALIVE = 0 ]', "ssh.key", Path("/etc/vmsched/id_ed25519")),
    ("SSH = [ CONNECT_TIMEOUT = 5, KEEPALIVE = 0 ]", "ssh.connect_timeout", 5),
    ("SSH = [ CONNECT_TIMEOUT = 5, KEEPALIVE = 0 ]", "ssh.keepalive", 0),
]


@pytest.mark.parametrize(("text", "attribute", "expected"), GOOD)
def test_good_values(text: str, attribute: str, expected: object) -> None:
    assert attrgetter(attribute)(parse_config(text, "s.conf")) == expected


def test_a_partial_vector_keeps_the_other_defaults() -> None:
    config = parse_config("SSH = [ CONNECT_TIMEOUT = 3 ]\nMAX_BACKUPS = 9", "s.conf")
    assert config == dataclasses.replace(
        Config.defaults(), max_backups=9, ssh=dataclasses.replace(SshConfig(), connect_timeout=3)
    )


# ---- bad values: one problem each, on line 2, as FILE:LINE: KEY: message ------------------------

BAD = [
    ("MAX_BACKUPS = five", 'MAX_BACKUPS: "five" is not an integer; expected an integer >= 0'),
    ("MAX_BACKUPS = 2.5", 'MAX_BACKUPS: "2.5" is not an integer; expected an integer >= 0'),
    ('MAX_BACKUPS = ""', 'MAX_BACKUPS: "" is not an integer; expected an integer >= 0'),
    ("MAX_BACKUPS_HOST = -1", "MAX_BACKUPS_HOST: -1 is out of range; expected an integer >= 0"),
    (
        "MESSAGE_SIZE = 2147483648",
        "MESSAGE_SIZE: 2147483648 is out of range; expected an integer from 65536 to 1073741824",
    ),
    ("MESSAGE_SIZE = 1024", "MESSAGE_SIZE: 1024 is out of range; expected an integer from 65536 to 1073741824"),
    ("DATASTORE_CAPACITY_CHECK = TRUE", 'DATASTORE_CAPACITY_CHECK: "TRUE" is not YES or NO'),
    ("DATASTORE_CAPACITY_CHECK = 1", 'DATASTORE_CAPACITY_CHECK: "1" is not YES or NO'),
    ("MISSED_RUNS = SOMETIMES", 'MISSED_RUNS: "SOMETIMES" is not one of ONCE, SKIP, ALL'),
    (
        "TIMEZONE = Mars/Olympus",
        'TIMEZONE: "Mars/Olympus" is not a known time zone; expected an IANA time zone name such as UTC or Europe/Paris',
    ),
    (
        "TIMEZONE = Europe",
        'TIMEZONE: "Europe" is not a known time zone; expected an IANA time zone name such as UTC or Europe/Paris',
    ),
    (
        'TIMEZONE = ""',
        'TIMEZONE: "" is not a known time zone; expected an IANA time zone name such as UTC or Europe/Paris',
    ),
    (
        'TIMEZONE = "/etc/localtime"',
        'TIMEZONE: "/etc/localtime" is not a known time zone; expected an IANA time zone name such as UTC or Europe/Paris',
    ),
    ("DRAIN_TIME = 5w", f'DRAIN_TIME: "5w" is not a duration; expected seconds >= 0 {DURATION}'),
    ("DRAIN_TIME = -5", f"DRAIN_TIME: -5 is out of range; expected seconds >= 0 {DURATION}"),
    ("MONITORING_INTERVAL_HOST = 0s", f"MONITORING_INTERVAL_HOST: 0 is out of range; expected seconds >= 1 {DURATION}"),
    ('BACKUP_BASE_PATH = "var/tmp"', 'BACKUP_BASE_PATH: "var/tmp" is not an absolute path; expected an absolute path'),
    ('BACKUP_BASE_PATH = ""', "BACKUP_BASE_PATH: an empty value is not allowed; expected an absolute path"),
    (
        "MAX_BACKUPS = [ HOST = 2 ]",
        'MAX_BACKUPS: expected a single value, not a vector, e.g. MAX_BACKUPS = "5"',
    ),
    (
        "LISTEN = 2633",
        'LISTEN: expected a vector, e.g. LISTEN = [ ADDRESS = "127.0.0.1", PORT = "2633", UNIX_SOCKET = "" ]',
    ),
    ("LISTEN = [ PORT = -1 ]", "LISTEN/PORT: -1 is out of range; expected an integer from 0 to 65535"),
    ("LISTEN = [ PORT = http ]", 'LISTEN/PORT: "http" is not an integer; expected an integer from 0 to 65535'),
    ('LISTEN = [ ADDRESS = "bad host" ]', 'LISTEN/ADDRESS: "bad host" is not an IP address or host name'),
    (
        'LISTEN = [ UNIX_SOCKET = "api.sock" ]',
        'LISTEN/UNIX_SOCKET: "api.sock" is not an absolute path; expected an absolute path, or empty',
    ),
    (
        'LISTEN = [ ADDRESS = "" ]',
        "LISTEN: neither ADDRESS nor UNIX_SOCKET is set, the API would not listen anywhere",
    ),
    ("LOG = [ SYSTEM = syslog ]", 'LOG/SYSTEM: "syslog" is not one of stderr, journald, file'),
    ("LOG = [ SYSTEM = file ]", "LOG/FILE: required when SYSTEM is file"),
    ("LOG = [ DEBUG_LEVEL = 4 ]", "LOG/DEBUG_LEVEL: 4 is out of range; expected an integer from 0 to 3"),
    ("SSH = [ CONNECT_TIMEOUT = 0 ]", f"SSH/CONNECT_TIMEOUT: 0 is out of range; expected seconds >= 1 {DURATION}"),
    ("RETRY = [ BACKOFF = soon ]", f'RETRY/BACKOFF: "soon" is not a duration; expected seconds >= 1 {DURATION}'),
    ("RETRY = [ MAX = -1 ]", "RETRY/MAX: -1 is out of range; expected an integer >= 0"),
    (
        'DB = [ PATH = "vmsched.db" ]',
        'DB/PATH: "vmsched.db" is not an absolute path; expected an absolute path, or empty',
    ),
]


@pytest.mark.parametrize(("text", "problem"), BAD)
def test_bad_values(text: str, problem: str) -> None:
    assert problems_of("# first line\n" + text) == [f"s.conf:2: {problem}"]


# ---- unknown keys -------------------------------------------------------------------------------

UNKNOWN = [
    ("MAX_BACKUP = 5", f"MAX_BACKUP: unknown key MAX_BACKUP; did you mean MAX_BACKUPS? (valid keys: {TOP_KEYS})"),
    ("timezon = UTC", f"TIMEZON: unknown key TIMEZON; did you mean TIMEZONE? (valid keys: {TOP_KEYS})"),
    ("SCHED_INTERVAL = 15", f"SCHED_INTERVAL: unknown key SCHED_INTERVAL (valid keys: {TOP_KEYS})"),
    (
        "LISTEN = [ PROT = 2633 ]",
        "LISTEN/PROT: unknown key PROT in LISTEN; did you mean PORT? (valid keys of LISTEN: ADDRESS, PORT, UNIX_SOCKET)",
    ),
    (
        "RETRY = [ MAXIMUM = 3 ]",
        "RETRY/MAXIMUM: unknown key MAXIMUM in RETRY; did you mean MAX? (valid keys of RETRY: BACKOFF, MAX)",
    ),
    (
        "LOG = [ COLOUR = YES ]",
        "LOG/COLOUR: unknown key COLOUR in LOG (valid keys of LOG: DEBUG_LEVEL, FILE, SYSTEM)",
    ),
]


@pytest.mark.parametrize(("text", "problem"), UNKNOWN)
def test_unknown_keys_suggest_and_list(text: str, problem: str) -> None:
    assert problems_of("\n\n" + text) == [f"s.conf:3: {problem}"]


# ---- duplicates, several problems, syntax -------------------------------------------------------


def test_a_key_given_twice() -> None:
    text = "MAX_BACKUPS = 1\n# note\nmax_backups = 2\nLISTEN = [ PORT = 1 ]\nLISTEN = [ PORT = 2 ]\nMAX_BACKUPS = 3"
    assert problems_of(text) == [
        "s.conf:3: MAX_BACKUPS: given twice (first at line 1)",
        "s.conf:5: LISTEN: given twice (first at line 4)",
        "s.conf:6: MAX_BACKUPS: given twice (first at line 1)",
    ]


def test_all_problems_are_reported_together() -> None:
    text = "\n".join(
        [
            "MAX_BACKUPS = many",
            "# fine lines in between",
            "MAX_BACKUPS_HOST = 3",
            "MAX_BACKUP_HOST = 2",
            "LISTEN = [",
            "  ADDRESS = 127.0.0.1,",
            "  PORT = 99999,",
            "  SOCKET = /run/x ]",
            "MISSED_RUNS = never",
            "LOG = [ SYSTEM = file ]",
        ]
    )
    assert problems_of(text, "/etc/vmsched/sched.conf") == [
        '/etc/vmsched/sched.conf:1: MAX_BACKUPS: "many" is not an integer; expected an integer >= 0',
        "/etc/vmsched/sched.conf:4: MAX_BACKUP_HOST: unknown key MAX_BACKUP_HOST; did you mean MAX_BACKUPS_HOST?"
        f" (valid keys: {TOP_KEYS})",
        "/etc/vmsched/sched.conf:5: LISTEN/PORT: 99999 is out of range; expected an integer from 0 to 65535",
        "/etc/vmsched/sched.conf:5: LISTEN/SOCKET: unknown key SOCKET in LISTEN; did you mean UNIX_SOCKET?"
        " (valid keys of LISTEN: ADDRESS, PORT, UNIX_SOCKET)",
        '/etc/vmsched/sched.conf:9: MISSED_RUNS: "never" is not one of ONCE, SKIP, ALL',
        "/etc/vmsched/sched.conf:10: LOG/FILE: required when SYSTEM is file",
    ]


def test_the_error_message_holds_every_problem_one_per_line() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config("MAX_BACKUPS = x\nDRAIN_TIME = y", "s.conf")
    assert str(caught.value).splitlines() == caught.value.problems
    assert len(caught.value.problems) == 2


@pytest.mark.parametrize("text", ["MAX_BACKUPS 5", "LISTEN = [ PORT = 1", 'TIMEZONE = "UTC'])
def test_syntax_errors_become_config_errors(text: str) -> None:
    text = "# c\n" + text
    with pytest.raises(TemplateError) as syntax:
        Template.parse_text_with_lines(text, "s.conf")
    assert str(syntax.value).startswith("s.conf:2:")
    assert problems_of(text) == [str(syntax.value)]


# ---- files --------------------------------------------------------------------------------------


def test_load_config_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "sched.conf"
    path.write_text("MAX_BACKUPS = 1\nMISSED_RUNS = SKIP\n")
    assert load_config(path) == dataclasses.replace(Config.defaults(), max_backups=1, missed_runs="SKIP")
    path.write_text("\nMAX_BACKUPS = x\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [f'{path}:2: MAX_BACKUPS: "x" is not an integer; expected an integer >= 0']


@pytest.mark.parametrize(
    ("content", "expected"),
    [(None, "cannot read: No such file or directory"), (b"\xff\xfe", "not UTF-8 text (byte 0)")],
)
def test_unreadable_files(tmp_path: Path, content: bytes | None, expected: str) -> None:
    path = tmp_path / "sched.conf"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [f"{path}: {expected}"]


# ---- the schema and the example file ------------------------------------------------------------


def test_schema_matches_the_typed_config() -> None:
    schema = describe_schema()
    assert [doc.name.lower() for doc in schema] == [f.name for f in dataclasses.fields(Config)]
    assert {doc.name: [sub.name for sub in doc.keys] for doc in schema if doc.type == "vector"} == {
        "RETRY": ["MAX", "BACKOFF"],
        "LISTEN": ["ADDRESS", "PORT", "UNIX_SOCKET"],
        "DB": ["PATH"],
        "LOG": ["SYSTEM", "FILE", "DEBUG_LEVEL"],
        "SSH": ["KNOWN_HOSTS", "KEY", "CONNECT_TIMEOUT", "KEEPALIVE"],
    }
    for doc in schema:
        assert doc.description and doc.type
        for sub in doc.keys:
            assert sub.description and sub.type and sub.type != "vector"


def test_every_documented_default_reads_back_as_the_default() -> None:
    lines = []
    for doc in describe_schema():
        if doc.type == "vector":
            lines.append(f"{doc.name} = {doc.default}")
        else:
            lines.append(f'{doc.name} = "{doc.default}"')
    assert parse_config("\n".join(lines), "s.conf") == Config.defaults()


def _example_template() -> Template:
    template, _ = Template.parse_text_with_lines(EXAMPLE.read_text(), str(EXAMPLE))
    return template


def test_example_sets_every_key_of_the_schema() -> None:
    template = _example_template()
    for doc in describe_schema():
        values = template.values(doc.name)
        assert len(values) == 1, doc.name
        if doc.type == "vector":
            assert isinstance(values[0], Vector), doc.name
            assert values[0].keys() == sorted(sub.name for sub in doc.keys), doc.name


def test_example_is_valid_and_states_the_defaults() -> None:
    assert load_config(EXAMPLE) == Config.defaults()


def test_example_documents_each_key_with_its_description_and_type() -> None:
    text = EXAMPLE.read_text()
    for doc in describe_schema():
        assert f"# {doc.name}: {doc.description}." in text
        if doc.type != "vector":
            assert f"#   {doc.type}; default " in text
        for sub in doc.keys:
            assert f"#   {sub.name}: {sub.description}." in text
            assert f"#     {sub.type}; default " in text


# ---- derived values -----------------------------------------------------------------------------

DERIVED = [
    (DbConfig().resolve(Path("/var/lib/vmsched")), Path("/var/lib/vmsched/vmsched.db")),
    (DbConfig(path=Path("/srv/state.db")).resolve(Path("/var/lib/vmsched")), Path("/srv/state.db")),
    (SshConfig().known_hosts_path(Path("/var/lib/vmsched")), Path("/var/lib/vmsched/known_hosts")),
    (SshConfig(known_hosts=Path("/etc/kh")).known_hosts_path(Path("/var/lib/vmsched")), Path("/etc/kh")),
    (LogConfig(debug_level=0).python_level, logging.ERROR),
    (LogConfig(debug_level=3).python_level, logging.DEBUG),
    (parse_config("TIMEZONE = Europe/Paris", "s.conf").zone, ZoneInfo("Europe/Paris")),
]


@pytest.mark.parametrize(("value", "expected"), DERIVED)
def test_derived_values(value: object, expected: object) -> None:
    assert value == expected


def test_problems_come_in_file_order() -> None:
    text = 'LOG = [ SYSTEM = file ]\nMAX_BACKUPS = x\nLISTEN = [ ADDRESS = "" ]'
    assert [problem.split(":")[1] for problem in problems_of(text)] == ["1", "2", "3"]
