"""sched.conf: the one schema of vmsched's configuration, its defaults and its validation.

The file uses the OpenNebula template syntax (spec §1). Every key is declared exactly once, as a field
of the frozen dataclasses below, with its default, its kind of value and a one-line description; the
reader, the defaults and ``describe_schema()`` come from those fields, and a test holds the hand-written
``sched.conf.example`` to them.
Vectors (``LISTEN = [ ... ]``) are fields whose type is itself such a dataclass.

Reading never stops at the first problem: every unknown key, duplicate and bad value is collected and
raised together in one :class:`ConfigError`, each as ``FILE:LINE: KEY: message``.
"""

from __future__ import annotations

import difflib
import ipaddress
import logging
import re
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Any, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from scheduler.errors import ConfigError, TemplateError
from scheduler.model.template import Template, Value, Vector, quote

# ---- kinds of values ----------------------------------------------------------------------------


class Kind(Protocol):
    def parse(self, text: str) -> Any:
        """The typed value of ``text``; raises ValueError with a self-contained message."""
        ...

    def format(self, value: Any) -> str:
        """The text that parses back to ``value``."""
        ...

    def describe(self) -> str:
        """What is allowed, for docs and error messages."""
        ...


@dataclass(frozen=True)
class Integer:
    minimum: int = 0
    maximum: int | None = None

    def parse(self, text: str) -> int:
        if not re.fullmatch(r"[+-]?[0-9]+", text.strip()):
            raise ValueError(f'"{text}" is not an integer; expected {self.describe()}')
        return self.in_range(int(text))

    def in_range(self, number: int) -> int:
        if number < self.minimum or (self.maximum is not None and number > self.maximum):
            raise ValueError(f"{number} is out of range; expected {self.describe()}")
        return number

    def format(self, value: int) -> str:
        return str(value)

    def describe(self) -> str:
        if self.maximum is None:
            return f"an integer >= {self.minimum}"
        return f"an integer from {self.minimum} to {self.maximum}"


_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class Duration(Integer):
    """Seconds, written as a plain number or with a unit (90s, 5m, 2h, 1d)."""

    def parse(self, text: str) -> int:
        match = re.fullmatch(r"([+-]?[0-9]+)\s*([smhd]?)", text.strip(), re.IGNORECASE)
        if not match:
            raise ValueError(f'"{text}" is not a duration; expected {self.describe()}')
        return self.in_range(int(match.group(1)) * _UNIT_SECONDS[match.group(2).lower()])

    def describe(self) -> str:
        return f"seconds >= {self.minimum} (or with a unit: 90s, 5m, 2h, 1d)"


@dataclass(frozen=True)
class YesNo:
    def parse(self, text: str) -> bool:
        word = text.strip().upper()
        if word not in ("YES", "NO"):
            raise ValueError(f'"{text}" is not YES or NO')
        return word == "YES"

    def format(self, value: bool) -> str:
        return "YES" if value else "NO"

    def describe(self) -> str:
        return "YES or NO"


@dataclass(frozen=True)
class OneOf:
    """One of a few words, matched without regard to case; the value is the declared spelling."""

    choices: tuple[str, ...]

    def parse(self, text: str) -> str:
        for choice in self.choices:
            if choice.lower() == text.strip().lower():
                return choice
        raise ValueError(f'"{text}" is not {self.describe()}')

    def format(self, value: str) -> str:
        return value

    def describe(self) -> str:
        return "one of " + ", ".join(self.choices)


@dataclass(frozen=True)
class AbsolutePath:
    """An absolute path; ``optional`` admits "" (read as None); ``remote`` paths live on the hosts."""

    optional: bool = False
    remote: bool = False

    def parse(self, text: str) -> Path | PurePosixPath | None:
        if not text:
            if self.optional:
                return None
            raise ValueError(f"an empty value is not allowed; expected {self.describe()}")
        if not text.startswith("/"):
            raise ValueError(f'"{text}" is not an absolute path; expected {self.describe()}')
        return PurePosixPath(text) if self.remote else Path(text)

    def format(self, value: PurePosixPath | None) -> str:
        return "" if value is None else str(value)

    def describe(self) -> str:
        return "an absolute path, or empty" if self.optional else "an absolute path"


_HOST_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\.?")


@dataclass(frozen=True)
class Address:
    """An IP address or host name to listen on, or "" for none."""

    def parse(self, text: str) -> str:
        value = text.strip()
        if value and not (_HOST_NAME.fullmatch(value) or _is_ip_address(value)):
            raise ValueError(f'"{text}" is not an IP address or host name')
        return value

    def format(self, value: str) -> str:
        return value

    def describe(self) -> str:
        return "an IP address or host name, or empty"


def _is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class TimeZoneName:
    def parse(self, text: str) -> str:
        try:
            ZoneInfo(text)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            raise ValueError(f'"{text}" is not a known time zone; expected {self.describe()}') from None
        return text

    def format(self, value: str) -> str:
        return value

    def describe(self) -> str:
        return "an IANA time zone name such as UTC or Europe/Paris"


# ---- declaring keys -----------------------------------------------------------------------------

_KIND = "kind"
_DESCRIPTION = "description"


def setting(default: Any, kind: Kind, description: str) -> Any:
    """A key holding one value."""
    return field(default=default, metadata={_KIND: kind, _DESCRIPTION: description})


def vector(section: type, description: str) -> Any:
    """A key holding a vector whose sub-keys are the fields of ``section``."""
    return field(default_factory=section, metadata={_DESCRIPTION: description})


def _key_name(spec: Field[Any]) -> str:
    return spec.name.upper()


def _default_of(spec: Field[Any]) -> Any:
    if spec.default is not MISSING:
        return spec.default
    return spec.default_factory()  # type: ignore[operator]  # a vector field always has a factory


def _is_vector(spec: Field[Any]) -> bool:
    return _KIND not in spec.metadata


# ---- the schema ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DbConfig:
    path: Path | None = setting(
        None, AbsolutePath(optional=True), "SQLite state file; empty means vmsched.db in the state directory"
    )

    def resolve(self, state_dir: Path) -> Path:
        return self.path or state_dir / "vmsched.db"


@dataclass(frozen=True)
class ListenConfig:
    address: str = setting(
        "127.0.0.1", Address(), "address of the XML-RPC HTTP endpoint (/RPC2); empty for no TCP listener"
    )
    port: int = setting(2633, Integer(0, 65535), "TCP port of the XML-RPC endpoint; 0 picks a free port")
    unix_socket: Path | None = setting(
        None, AbsolutePath(optional=True), "also serve the API on this unix socket; empty for none"
    )


@dataclass(frozen=True)
class LogConfig:
    system: str = setting(
        "stderr",
        OneOf(("stderr", "journald", "file")),
        "stderr with timestamps, journald (stderr, no timestamps, syslog priorities) or file",
    )
    file: Path | None = setting(None, AbsolutePath(optional=True), "log file, required when SYSTEM is file")
    debug_level: int = setting(2, Integer(0, 3), "0 errors, 1 warnings, 2 info, 3 debug (as OpenNebula's DEBUG_LEVEL)")

    @property
    def python_level(self) -> int:
        return (logging.ERROR, logging.WARNING, logging.INFO, logging.DEBUG)[self.debug_level]


@dataclass(frozen=True)
class SshConfig:
    known_hosts: Path | None = setting(
        None,
        AbsolutePath(optional=True),
        "verified host keys of hosts and backup servers; empty means known_hosts in the state directory",
    )
    key: Path | None = setting(
        None,
        AbsolutePath(optional=True),
        "private key for hosts; empty means the service user's default keys and agent",
    )
    connect_timeout: int = setting(10, Duration(minimum=1), "seconds to wait for an SSH connection")
    keepalive: int = setting(30, Duration(minimum=0), "seconds between SSH keepalive probes; 0 turns them off")

    def known_hosts_path(self, state_dir: Path) -> Path:
        return self.known_hosts or state_dir / "known_hosts"


@dataclass(frozen=True)
class RetryConfig:
    max: int = setting(
        3, Integer(minimum=0), "retries of a failed run before waiting for the next occurrence; 0 for none"
    )
    backoff: int = setting(60, Duration(minimum=1), "seconds before the first retry, doubled for each further one")


@dataclass(frozen=True)
class Config:
    max_backups: int = setting(5, Integer(minimum=0), "backups running at once in the whole cloud; 0 = unlimited")
    max_backups_host: int = setting(2, Integer(minimum=0), "backups running at once on one host; 0 = unlimited")
    max_backups_datastore: int = setting(
        0, Integer(minimum=0), "backups running at once into one backup datastore; 0 = unlimited"
    )
    datastore_capacity_check: bool = setting(True, YesNo(), "check the backup datastore's free space before a backup")
    backup_base_path: PurePosixPath = setting(
        PurePosixPath("/var/tmp/vmsched"), AbsolutePath(remote=True), "staging directory for disk backups on each host"
    )
    timezone: str = setting("UTC", TimeZoneName(), "time zone of calendar schedules (weekly, monthly, cron)")
    missed_runs: str = setting(
        "ONCE", OneOf(("ONCE", "SKIP", "ALL")), "runs missed while the daemon was down: run ONCE, SKIP them, or run ALL"
    )
    retry: RetryConfig = vector(RetryConfig, "retries of failed runs, with exponential backoff")
    drain_time: int = setting(
        60, Duration(minimum=0), "seconds a stopping daemon lets running actions finish before cancelling them"
    )
    monitoring_interval_host: int = setting(60, Duration(minimum=1), "seconds between host monitoring rounds")
    monitoring_interval_datastore: int = setting(
        300, Duration(minimum=1), "seconds between backup datastore monitoring rounds"
    )
    listen: ListenConfig = vector(ListenConfig, "where the XML-RPC API listens")
    message_size: int = setting(1073741824, Integer(65536, 1073741824), "largest XML-RPC request accepted, in bytes")
    session_cache_ttl: int = setting(
        300, Duration(minimum=0), "seconds a verified password stays cached; 0 verifies every call"
    )
    db: DbConfig = vector(DbConfig, "state database")
    log: LogConfig = vector(LogConfig, "logging")
    ssh: SshConfig = vector(SshConfig, "SSH to hosts and backup servers")

    @classmethod
    def defaults(cls) -> Config:
        return cls()

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


# ---- describing the schema ----------------------------------------------------------------------


@dataclass(frozen=True)
class KeyDoc:
    """One key as documentation: ``type`` is "vector" for vectors, whose sub-keys are in ``keys``."""

    name: str
    type: str
    default: str
    description: str
    keys: tuple[KeyDoc, ...] = ()


def describe_schema() -> list[KeyDoc]:
    """Every key of sched.conf, in schema order."""
    return [_describe(spec) for spec in fields(Config)]


def _describe(spec: Field[Any]) -> KeyDoc:
    description = spec.metadata[_DESCRIPTION]
    if _is_vector(spec):
        subs = tuple(_describe(sub) for sub in fields(_default_of(spec)))
        return KeyDoc(_key_name(spec), "vector", _render_vector(subs), description, subs)
    kind: Kind = spec.metadata[_KIND]
    return KeyDoc(_key_name(spec), kind.describe(), kind.format(_default_of(spec)), description)


def _render_vector(subs: tuple[KeyDoc, ...]) -> str:
    return "[ " + ", ".join(f"{sub.name} = {quote(sub.default)}" for sub in subs) + " ]"


# ---- reading ------------------------------------------------------------------------------------


def load_config(path: Path) -> Config:
    """Read and validate ``path``; every problem is in the one ConfigError raised."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text (byte {exc.start})"]) from None
    return parse_config(text, str(path))


def parse_config(text: str, source: str = "sched.conf") -> Config:
    """Validate sched.conf text; ``source`` names it in problems (``source:line: KEY: message``)."""
    try:
        template, lines = Template.parse_text_with_lines(text, source)
    except TemplateError as exc:
        raise ConfigError([str(exc)]) from None
    reader = _Reader(source)
    config = reader.read(list(zip(template.attributes, lines, strict=True)))
    if reader.problems:
        raise ConfigError(reader.problems)
    return config


class _Bad:
    """Marks a value that was reported as a problem."""


_BAD = _Bad()


class _Reader:
    def __init__(self, source: str) -> None:
        self.source = source
        self._found: list[tuple[int, str]] = []

    def problem(self, line: int, key: str, message: str) -> None:
        self._found.append((line, f"{self.source}:{line}: {key}: {message}"))

    @property
    def problems(self) -> list[str]:
        """In file order; problems of one line in the order they were found."""
        return [text for _, text in sorted(self._found, key=lambda found: found[0])]

    def read(self, attributes: list[tuple[tuple[str, Value], int]]) -> Config:
        specs = {_key_name(spec): spec for spec in fields(Config)}
        values: dict[str, Any] = {}
        first_line: dict[str, int] = {}
        for (name, value), line in attributes:
            if name in first_line:
                self.problem(line, name, f"given twice (first at line {first_line[name]})")
                continue
            first_line[name] = line
            spec = specs.get(name)
            if spec is None:
                self.problem(line, name, _unknown(name, list(specs)))
                continue
            parsed = self.value(spec, value, line)
            if parsed is not _BAD:
                values[spec.name] = parsed
        config = Config(**values)
        for key, message in _cross_check(config):
            self.problem(first_line.get(key.split("/")[0], 0), key, message)
        return config

    def value(self, spec: Field[Any], value: Value, line: int) -> Any:
        name = _key_name(spec)
        if _is_vector(spec):
            if not isinstance(value, Vector):
                self.problem(line, name, f"expected a vector, e.g. {name} = {_describe(spec).default}")
                return _BAD
            return self.section(spec, value, line)
        if isinstance(value, Vector):
            self.problem(
                line, name, f"expected a single value, not a vector, e.g. {name} = {quote(_describe(spec).default)}"
            )
            return _BAD
        return self.scalar(spec, name, value, line)

    def scalar(self, spec: Field[Any], label: str, text: str, line: int) -> Any:
        try:
            return spec.metadata[_KIND].parse(text)
        except ValueError as exc:
            self.problem(line, label, str(exc))
            return _BAD

    def section(self, spec: Field[Any], vector_value: Vector, line: int) -> Any:
        section_type = type(_default_of(spec))
        subs = {_key_name(sub): sub for sub in fields(section_type)}
        name = _key_name(spec)
        values: dict[str, Any] = {}
        ok = True
        for key, text in vector_value.items():
            sub = subs.get(key)
            if sub is None:
                self.problem(line, f"{name}/{key}", _unknown(key, list(subs), within=name))
                ok = False
                continue
            parsed = self.scalar(sub, f"{name}/{key}", text, line)
            ok = ok and parsed is not _BAD
            values[sub.name] = parsed
        return section_type(**values) if ok else _BAD


def _unknown(name: str, valid: list[str], within: str = "") -> str:
    where = f" in {within}" if within else ""
    message = f"unknown key {name}{where}"
    close = difflib.get_close_matches(name, valid, n=1)
    if close:
        message += f"; did you mean {close[0]}?"
    listing = f"valid keys of {within}" if within else "valid keys"
    return f"{message} ({listing}: {', '.join(sorted(valid))})"


def _cross_check(config: Config) -> list[tuple[str, str]]:
    """Rules that tie keys together, as (KEY or VECTOR/KEY, message)."""
    problems = []
    if config.log.system == "file" and config.log.file is None:
        problems.append(("LOG/FILE", "required when SYSTEM is file"))
    if not config.listen.address and config.listen.unix_socket is None:
        problems.append(("LISTEN", "neither ADDRESS nor UNIX_SOCKET is set, the API would not listen anywhere"))
    return problems
