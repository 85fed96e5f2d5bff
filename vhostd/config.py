"""The daemon's configuration: model, TOML loader, command-line merge, reload plan.

The configuration is one TOML file (`/etc/vhostd/vhostd.toml` by default).
Loading it either yields a complete, validated `DaemonConfig` or raises
`ConfigError` listing *every* problem with its line, so an operator fixes a
file in one pass instead of one restart per typo. Nothing downstream
re-validates: a `DaemonConfig` that exists is one the daemon can run.

Unknown keys are errors (a misspelt `mtu` silently ignored would be worse than
a refusal to start), with a "did you mean" hint.

Paths in problems count array elements from 0: the second `[[port]]` table
is `port[1]`.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import ipaddress
import json
import math
import os
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Final, TypeVar

from vhostd.iotlb import DEFAULT_CAPACITY as DEFAULT_IOTLB_ENTRIES
from vhostd.tomlpos import KeyLines

DEFAULT_CONFIG_PATH: Final = "/etc/vhostd/vhostd.toml"
DEFAULT_CONTROL_SOCKET: Final = "/run/vhostd/control.sock"
SUN_PATH_SIZE: Final = 108  # sizeof(sockaddr_un.sun_path), the NUL included
IFNAMSIZ: Final = 16  # Linux interface name buffer, the NUL included
MIN_MTU: Final = 68  # RFC 791 minimum
MAX_MTU: Final = 65535  # virtio-net config space field is 16 bits
MAX_QUEUE_PAIRS: Final = 8
MIN_SOURCE_FRAME: Final = 60  # the shortest Ethernet frame, FCS excluded
MAX_FRAME_OVER_MTU: Final = 18  # Ethernet header + one VLAN tag: what the device takes on TX
DEFAULT_SOURCE_FRAME: Final = 64
MIN_IOTLB_ENTRIES: Final = 16
MAX_IOTLB_ENTRIES: Final = 1 << 20
LOG_LEVELS: Final = ("debug", "info", "warning", "error", "critical")
COMMAND_LINE: Final = "<command line>"

_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_IFNAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
_MAC_RE = re.compile(r"[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){5}")


class PortMode(enum.StrEnum):
    """What a port does with the frames its guest sends."""

    SWITCH = "switch"  # through the learning switch to the other ports and taps
    REFLECT = "reflect"  # straight back to the same guest (loopback tests)
    SINK = "sink"  # counted and dropped (throughput tests)
    # Dropped like sink; the RX rings are filled with generated frames as fast as
    # the guest posts buffers (back-end -> front-end throughput tests).
    SOURCE = "source"


@dataclass(frozen=True, slots=True)
class FeatureConfig:
    """virtio-net features the port offers; the guest may still decline them.

    Each switch exists to work around a front-end that mishandles a feature,
    not to tune performance: leave them on unless a guest misbehaves.
    """

    mrg_rxbuf: bool = True
    event_idx: bool = True
    indirect_desc: bool = True
    mq: bool = True
    mtu: bool = True
    status: bool = True
    any_layout: bool = True
    packed: bool = True
    """RING_PACKED: VIRTIO 1.1 packed rings (QEMU packed=on, DPDK packed_vq=1)."""
    # Offloads (virtio-net header metadata). csum: the guest may hand over frames
    # with the checksum left to the device (CSUM); host_tso: and TCP super-frames
    # of up to 64 KiB (HOST_TSO4/6, needs csum); guest_csum / guest_tso: the
    # guest takes them (GUEST_CSUM, GUEST_TSO4/6, needs guest_csum); ecn: the
    # ECN flag on super-frames, both ways (HOST_ECN/GUEST_ECN, with the TSOs).
    # Receivers that lack one get frames segmented/checksummed by vhostd.
    csum: bool = True
    guest_csum: bool = True
    host_tso: bool = True
    guest_tso: bool = True
    ecn: bool = True


@dataclass(frozen=True, slots=True)
class PortConfig:
    """One vhost-user socket, i.e. one guest NIC."""

    name: str
    socket: str
    mode: PortMode = PortMode.SWITCH
    # True: connect to a front-end that listens (QEMU `server=on`) and
    # reconnect after reconnect_seconds; False: listen for it.
    client: bool = False
    # Ownership and mode of the socket file the daemon creates (listening only).
    owner: str | None = None
    group: str | None = None
    socket_mode: int = 0o660
    queue_pairs: int = 4  # most queue pairs offered (GET_QUEUE_NUM)
    mtu: int = 1500
    mac: str | None = None  # lower-case; None lets the guest keep its own
    iommu: bool = True  # offer ACCESS_PLATFORM so a guest vIOMMU can fence us
    # Most device IOTLB entries kept (iommu only); least recently used go first.
    iotlb_entries: int = DEFAULT_IOTLB_ENTRIES
    features: FeatureConfig = field(default_factory=FeatureConfig)
    reconnect_seconds: float = 1.0
    # Bytes per generated frame (mode "source" only), Ethernet header included.
    source_frame_size: int = DEFAULT_SOURCE_FRAME


@dataclass(frozen=True, slots=True)
class TapConfig:
    """A TAP interface plugged into the switch."""

    name: str
    mtu: int | None = None  # None leaves the kernel's default
    offloads: bool = True
    """IFF_VNET_HDR: checksum/TSO frames to and from the kernel whole (see ``tap``)."""


@dataclass(frozen=True, slots=True)
class SwitchConfig:
    mac_ageing_seconds: float = 300.0
    mac_table_size: int = 4096


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """Prometheus endpoint; `listen` None means no HTTP listener at all."""

    listen: str | None = None

    @property
    def address(self) -> tuple[str, int] | None:
        """(host, port) for a socket bind, IPv6 without brackets."""
        return None if self.listen is None else parse_listen(self.listen)


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    ports: tuple[PortConfig, ...] = ()
    taps: tuple[TapConfig, ...] = ()
    switch: SwitchConfig = field(default_factory=SwitchConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    control_socket: str = DEFAULT_CONTROL_SOCKET
    log_level: str = "info"


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One thing wrong with a configuration, located for a human to fix."""

    line: int | None  # 1-based; None when no line applies (command line, I/O)
    path: str  # "port[1].mtu"; "" for the document as a whole
    message: str
    filename: str = ""

    def __str__(self) -> str:
        where = self.filename or "<config>"
        if self.line is not None:
            where = f"{where}:{self.line}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(Exception):
    """The configuration cannot be used; `problems` lists every reason."""

    def __init__(self, problems: Sequence[ConfigProblem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


# --- public entry points -------------------------------------------------------


def load_config(path: str | os.PathLike[str] = DEFAULT_CONFIG_PATH) -> DaemonConfig:
    """Read and validate a configuration file; raise ConfigError on any problem."""
    filename = os.fspath(path)
    try:
        data = Path(filename).read_bytes()
    except OSError as exc:
        raise ConfigError(
            [ConfigProblem(None, "", f"cannot read: {exc.strerror}", filename)]
        ) from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError([ConfigProblem(line, "", "file is not valid UTF-8", filename)]) from exc
    return parse_config(text, filename)


def parse_config(text: str, filename: str = "<config>") -> DaemonConfig:
    """Validate TOML text; raise ConfigError on any problem."""
    config, problems = _parse(text, filename)
    if problems or config is None:
        raise ConfigError(problems)
    return config


def check_config_text(text: str, filename: str = "<config>") -> list[ConfigProblem]:
    """Every problem in `text` (empty when it is a valid configuration).

    A TOML syntax error stops the check there: what follows cannot be parsed.
    """
    return _parse(text, filename)[1]


def _parse(text: str, filename: str) -> tuple[DaemonConfig | None, list[ConfigProblem]]:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return None, [_syntax_problem(str(exc), text, filename)]
    return _build(raw, KeyLines.scan(text), filename)


_POSITION = re.compile(r"\s*\((?:at line (\d+), column \d+|at end of document)\)$")


def _syntax_problem(message: str, text: str, filename: str) -> ConfigProblem:
    match = _POSITION.search(message)
    if match is None:
        return ConfigProblem(None, "", f"TOML syntax error: {message}", filename)
    line = int(match.group(1)) if match.group(1) else max(1, len(text.splitlines()))
    detail = message[: match.start()]
    if not match.group(1):
        detail += " (at end of file)"
    return ConfigProblem(line, "", f"TOML syntax error: {detail}", filename)


# --- validation ------------------------------------------------------------------

_TOP_KEYS: Final = ("log_level", "control_socket", "metrics", "switch", "port", "tap")
_PORT_KEYS: Final = tuple(f.name for f in dataclasses.fields(PortConfig))
_FEATURE_KEYS: Final = tuple(f.name for f in dataclasses.fields(FeatureConfig))
_FEATURE_DEFAULTS: Final[dict[str, bool]] = {
    f.name: bool(f.default) for f in dataclasses.fields(FeatureConfig)
}
_TAP_KEYS: Final = tuple(f.name for f in dataclasses.fields(TapConfig))
_SWITCH_KEYS: Final = tuple(f.name for f in dataclasses.fields(SwitchConfig))
_METRICS_KEYS: Final = tuple(f.name for f in dataclasses.fields(MetricsConfig))

T = TypeVar("T")


def _type_name(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date/time"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class _Checker:
    """Collects problems while reading a raw TOML dict into dataclasses.

    Each getter returns the default after reporting a problem, so reading goes
    on and later keys are still checked.
    """

    def __init__(self, lines: KeyLines, filename: str) -> None:
        self.lines = lines
        self.filename = filename
        self.problems: list[ConfigProblem] = []

    def report(self, path: str, message: str) -> None:
        self.problems.append(ConfigProblem(self.lines.line_of(path), path, message, self.filename))

    def line(self, path: str) -> int | None:
        return self.lines.line_of(path)

    def known_keys(self, raw: Mapping[str, Any], path: str, allowed: Sequence[str]) -> None:
        for key in raw:
            if key in allowed:
                continue
            close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            self.report(_join(path, key), f"unknown key {key!r}{hint}")

    def table(self, raw: Mapping[str, Any], path: str, key: str) -> dict[str, Any]:
        value = raw.get(key, {})
        if not isinstance(value, dict):
            self.report(_join(path, key), f"must be a table, not {_type_name(value)}")
            return {}
        return value

    def array_of_tables(self, raw: Mapping[str, Any], key: str) -> list[dict[str, Any] | None]:
        value = raw.get(key, [])
        if isinstance(value, dict):
            self.report(key, f"must be an array of tables: write [[{key}]], not [{key}]")
            return []
        if not isinstance(value, list):
            self.report(key, f"must be an array of tables ([[{key}]]), not {_type_name(value)}")
            return []
        out: list[dict[str, Any] | None] = []
        for i, item in enumerate(value):
            if isinstance(item, dict):
                out.append(item)
            else:
                self.report(f"{key}[{i}]", f"must be a table, not {_type_name(item)}")
                out.append(None)
        return out

    def boolean(self, raw: Mapping[str, Any], path: str, key: str, default: bool) -> bool:
        value = raw.get(key, default)
        if not isinstance(value, bool):
            self.report(_join(path, key), f"must be true or false, not {_type_name(value)}")
            return default
        return value

    def integer(
        self, raw: Mapping[str, Any], path: str, key: str, default: T, low: int, high: int
    ) -> int | T:
        if key not in raw:
            return default
        value = raw[key]
        if isinstance(value, bool) or not isinstance(value, int):
            self.report(_join(path, key), f"must be an integer, not {_type_name(value)}")
            return default
        if not low <= value <= high:
            self.report(_join(path, key), f"must be between {low} and {high}, not {value}")
            return default
        return value

    def number(
        self, raw: Mapping[str, Any], path: str, key: str, default: float, high: float
    ) -> float:
        """A positive finite number of seconds (TOML ints accepted: `300`)."""
        if key not in raw:
            return default
        value = raw[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.report(_join(path, key), f"must be a number, not {_type_name(value)}")
            return default
        if not (math.isfinite(value) and 0 < value <= high):
            self.report(
                _join(path, key), f"must be greater than 0 and at most {high:g}, not {value}"
            )
            return default
        return float(value)

    def string(self, raw: Mapping[str, Any], path: str, key: str) -> str | None:
        """None when absent or wrong (reported); never an empty string."""
        if key not in raw:
            return None
        value = raw[key]
        if not isinstance(value, str):
            self.report(_join(path, key), f"must be a string, not {_type_name(value)}")
            return None
        if not value:
            self.report(_join(path, key), "must not be empty")
            return None
        return value

    def socket_path(self, raw: Mapping[str, Any], path: str, key: str) -> str | None:
        value = self.string(raw, path, key)
        if value is None:
            return None
        problem = socket_path_problem(value)
        if problem:
            self.report(_join(path, key), problem)
            return None
        return os.path.normpath(value)


def socket_path_problem(path: str) -> str | None:
    """Why `path` cannot be a listening AF_UNIX socket path, or None."""
    if "\0" in path:
        return "must not contain a NUL character"
    if not path.startswith("/"):
        return f"must be an absolute path (the daemon runs in /), not {path!r}"
    size = len(os.fsencode(path))
    if size >= SUN_PATH_SIZE:
        return f"is {size} bytes long; a Unix socket path must be under {SUN_PATH_SIZE} bytes"
    return None


def tap_name_problem(name: str) -> str | None:
    """Why `name` cannot be a Linux interface name, or None."""
    if len(name.encode()) >= IFNAMSIZ:
        return f"{name!r} is longer than {IFNAMSIZ - 1} bytes (IFNAMSIZ)"
    if name in (".", "..") or not _IFNAME_RE.fullmatch(name):
        return f"{name!r} is not a valid interface name (letters, digits, '_', '.', '-')"
    return None


def parse_mac(text: str) -> str:
    """Normalise a unicast MAC to lower case; ValueError says what is wrong."""
    if not _MAC_RE.fullmatch(text):
        raise ValueError(f"{text!r} is not a MAC address like 52:54:00:12:34:56")
    octets = bytes.fromhex(text.replace(":", ""))
    if octets[0] & 1:
        raise ValueError(f"{text!r} is a multicast address; a NIC needs a unicast one")
    if not any(octets):
        raise ValueError(f"{text!r} is the all-zero address")
    return text.lower()


_BRACKETED = re.compile(r"\[([^\]]+)\]:(\d{1,5})")
_HOST_PORT = re.compile(r"([^:\[\]]+):(\d{1,5})")


def parse_listen(text: str) -> tuple[str, int]:
    """Parse `127.0.0.1:9720`, `[::1]:9720` or `localhost:9720` (port 0: any free).

    Only literal addresses and `localhost`: resolving names at start-up would
    make the daemon depend on DNS being up.
    """
    if match := _BRACKETED.fullmatch(text):
        host, port_text = match.groups()
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    elif match := _HOST_PORT.fullmatch(text):
        host, port_text = match.groups()
        if host != "localhost":
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise ValueError(
                    f"{host!r} is not an IPv4 address or 'localhost' (no DNS names)"
                ) from None
    elif text.count(":") > 1:
        raise ValueError(f"{text!r}: put an IPv6 address in brackets, e.g. [::1]:9720")
    else:
        raise ValueError(f"{text!r} is not HOST:PORT, e.g. 127.0.0.1:9720")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port {port} is out of range 0..65535")
    return host, port


def _build(
    raw: Mapping[str, Any], lines: KeyLines, filename: str
) -> tuple[DaemonConfig | None, list[ConfigProblem]]:
    c = _Checker(lines, filename)
    c.known_keys(raw, "", _TOP_KEYS)

    log_level = LOG_LEVELS[1]
    if (level := c.string(raw, "", "log_level")) is not None:
        if level.lower() in LOG_LEVELS:
            log_level = level.lower()
        else:
            c.report("log_level", f"must be one of {', '.join(LOG_LEVELS)}, not {level!r}")
    control_socket = c.socket_path(raw, "", "control_socket") or DEFAULT_CONTROL_SOCKET

    metrics_raw = c.table(raw, "", "metrics")
    c.known_keys(metrics_raw, "metrics", _METRICS_KEYS)
    listen = c.string(metrics_raw, "metrics", "listen")
    if listen is not None:
        try:
            parse_listen(listen)
        except ValueError as exc:
            c.report("metrics.listen", str(exc))
            listen = None

    switch_raw = c.table(raw, "", "switch")
    c.known_keys(switch_raw, "switch", _SWITCH_KEYS)
    switch = SwitchConfig(
        mac_ageing_seconds=c.number(switch_raw, "switch", "mac_ageing_seconds", 300.0, 86400.0),
        mac_table_size=c.integer(switch_raw, "switch", "mac_table_size", 4096, 1, 1 << 20),
    )

    ports = [
        _port(c, item, i)
        for i, item in enumerate(c.array_of_tables(raw, "port"))
        if item is not None
    ]
    taps = [
        _tap(c, item, i) for i, item in enumerate(c.array_of_tables(raw, "tap")) if item is not None
    ]
    _check_unique(c, ports, taps, control_socket)

    if c.problems:
        # Stable: problems on one line keep the order they were found in.
        return None, sorted(c.problems, key=lambda p: (p.line is None, p.line or 0))
    config = DaemonConfig(
        ports=tuple(port for _, port, _ in ports),
        taps=tuple(tap for _, tap in taps),
        switch=switch,
        metrics=MetricsConfig(listen=listen),
        control_socket=control_socket,
        log_level=log_level,
    )
    return config, []


def _port(c: _Checker, raw: Mapping[str, Any], i: int) -> tuple[int, PortConfig, bool]:
    """The port (defaults standing in for bad values), and whether it was named."""
    path = f"port[{i}]"
    c.known_keys(raw, path, _PORT_KEYS)
    if "socket" not in raw:
        c.report(f"{path}.socket", "missing required key 'socket'")
    socket = c.socket_path(raw, path, "socket") or ""

    name = c.string(raw, path, "name")
    if name is not None and not _NAME_RE.fullmatch(name):
        c.report(f"{path}.name", f"{name!r} is not a valid port name (1-64 of A-Z a-z 0-9 _ . -)")
    elif name is None and "name" not in raw and socket:
        name = PurePosixPath(socket).stem
        if not _NAME_RE.fullmatch(name):
            c.report(
                f"{path}.socket",
                f"the port name defaults to the socket file's stem, {name!r}, which is not a "
                "valid port name: set name explicitly",
            )

    mode = PortMode.SWITCH
    if (mode_text := c.string(raw, path, "mode")) is not None:
        try:
            mode = PortMode(mode_text)
        except ValueError:
            choices = ", ".join(m.value for m in PortMode)
            c.report(f"{path}.mode", f"must be one of {choices}, not {mode_text!r}")

    client = c.boolean(raw, path, "client", False)
    owner = c.string(raw, path, "owner")
    group = c.string(raw, path, "group")
    socket_mode = _socket_mode(c, raw, path)
    if client:
        for key in ("owner", "group", "socket_mode"):
            if key in raw:
                c.report(f"{path}.{key}", "has no effect with client = true (no socket file)")
    elif "reconnect_seconds" in raw:
        c.report(f"{path}.reconnect_seconds", "only applies with client = true")

    mac = None
    if (mac_text := c.string(raw, path, "mac")) is not None:
        try:
            mac = parse_mac(mac_text)
        except ValueError as exc:
            c.report(f"{path}.mac", str(exc))

    features_raw = c.table(raw, path, "features")
    c.known_keys(features_raw, f"{path}.features", _FEATURE_KEYS)
    features = FeatureConfig(
        **{
            key: c.boolean(features_raw, f"{path}.features", key, _FEATURE_DEFAULTS[key])
            for key in _FEATURE_KEYS
        }
    )
    queue_pairs = c.integer(raw, path, "queue_pairs", 4, 1, MAX_QUEUE_PAIRS)
    if queue_pairs > 1 and not features.mq and "queue_pairs" in raw:
        c.report(f"{path}.queue_pairs", "more than 1 queue pair needs features.mq = true")

    mtu = c.integer(raw, path, "mtu", 1500, MIN_MTU, MAX_MTU)
    source_frame_size = _source_frame_size(c, raw, path, mode, mtu)
    iommu = c.boolean(raw, path, "iommu", True)
    iotlb_entries = c.integer(
        raw, path, "iotlb_entries", DEFAULT_IOTLB_ENTRIES, MIN_IOTLB_ENTRIES, MAX_IOTLB_ENTRIES
    )
    if not iommu and "iotlb_entries" in raw:
        c.report(f"{path}.iotlb_entries", "only applies with iommu = true (no device IOTLB)")

    port = PortConfig(
        name=name or "",
        socket=socket,
        mode=mode,
        client=client,
        owner=owner,
        group=group,
        socket_mode=socket_mode,
        queue_pairs=1 if not features.mq else queue_pairs,
        mtu=mtu,
        mac=mac,
        iommu=iommu,
        iotlb_entries=iotlb_entries,
        features=features,
        reconnect_seconds=c.number(raw, path, "reconnect_seconds", 1.0, 3600.0),
        source_frame_size=source_frame_size,
    )
    return i, port, "name" in raw


def _source_frame_size(
    c: _Checker, raw: Mapping[str, Any], path: str, mode: PortMode, mtu: int
) -> int:
    """Frames a source port generates must be ones its guest was told it may get.

    The bound is the MTU plus an Ethernet header and a VLAN tag, the largest
    frame the device itself accepts from the guest (1518 at MTU 1500, the
    size a Linux guest's small RX buffers are made for).
    """
    if "source_frame_size" not in raw:
        return DEFAULT_SOURCE_FRAME
    key = f"{path}.source_frame_size"
    if mode is not PortMode.SOURCE:
        c.report(key, 'only applies with mode = "source"')
        return DEFAULT_SOURCE_FRAME
    size = c.integer(raw, path, "source_frame_size", None, MIN_SOURCE_FRAME, MAX_MTU)
    if size is None:
        return DEFAULT_SOURCE_FRAME
    if size > mtu + MAX_FRAME_OVER_MTU:
        c.report(
            key,
            f"must be at most mtu + {MAX_FRAME_OVER_MTU} = {mtu + MAX_FRAME_OVER_MTU} "
            f"(the guest is told its MTU is {mtu}), not {size}",
        )
        return DEFAULT_SOURCE_FRAME
    return size


def _socket_mode(c: _Checker, raw: Mapping[str, Any], path: str) -> int:
    """`socket_mode = 0o660` (TOML octal) or `"0660"` (how chmod spells it)."""
    value = raw.get("socket_mode", 0o660)
    if isinstance(value, str) and re.fullmatch(r"(?:0o)?[0-7]{1,4}", value):
        value = int(value.removeprefix("0o"), 8)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o777:
        c.report(f"{path}.socket_mode", f"must be a permission mode like 0o660, not {value!r}")
        return 0o660
    return value


def _tap(c: _Checker, raw: Mapping[str, Any], i: int) -> tuple[int, TapConfig]:
    path = f"tap[{i}]"
    c.known_keys(raw, path, _TAP_KEYS)
    name = c.string(raw, path, "name")
    if name is None and "name" not in raw:
        c.report(f"{path}.name", "missing required key 'name'")
    elif name is not None and (problem := tap_name_problem(name)):
        c.report(f"{path}.name", problem)
    mtu = c.integer(raw, path, "mtu", None, MIN_MTU, MAX_MTU)
    offloads = c.boolean(raw, path, "offloads", True)
    return i, TapConfig(name=name or "", mtu=mtu, offloads=offloads)


def _check_unique(
    c: _Checker,
    ports: Sequence[tuple[int, PortConfig, bool]],
    taps: Sequence[tuple[int, TapConfig]],
    control_socket: str,
) -> None:
    names: dict[str, int] = {}
    sockets: dict[str, str] = {control_socket: "control_socket"}
    for i, port, named in ports:
        if port.name:
            if port.name in names:
                first = f"port[{names[port.name]}]"
                derived = "" if named else " (from the socket file's stem)"
                c.report(
                    f"port[{i}].{'name' if named else 'socket'}",
                    f"duplicate port name {port.name!r}{derived}; "
                    f"first used by {first}{_at(c, first)}",
                )
            else:
                names[port.name] = i
        if port.socket:
            if port.socket in sockets:
                first = sockets[port.socket]
                c.report(
                    f"port[{i}].socket",
                    f"duplicate socket {port.socket}; first used by {first}{_at(c, first)}",
                )
            else:
                sockets[port.socket] = f"port[{i}]"
    tap_names: dict[str, int] = {}
    for i, tap in taps:
        if tap.name in tap_names:
            first = f"tap[{tap_names[tap.name]}]"
            c.report(
                f"tap[{i}].name",
                f"duplicate tap {tap.name!r}; first used by {first}{_at(c, first)}",
            )
        elif tap.name:
            tap_names[tap.name] = i


def _at(c: _Checker, path: str) -> str:
    line = c.line(path)
    return f", line {line}" if line is not None else ""


# --- writing a configuration back ---------------------------------------------------


def config_to_dict(config: DaemonConfig) -> dict[str, Any]:
    """The TOML-shaped dict that `parse_config` would read back as `config`."""

    def clean(obj: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if value is None:
                continue
            out[f.name] = clean(value) if dataclasses.is_dataclass(value) else value
        return out

    raw: dict[str, Any] = {
        "log_level": config.log_level,
        "control_socket": config.control_socket,
        "metrics": clean(config.metrics),
        "switch": clean(config.switch),
        "port": [clean(p) for p in config.ports],
        "tap": [clean(t) for t in config.taps],
    }
    for port in raw["port"]:
        port["mode"] = str(port["mode"])
        if port["mode"] != PortMode.SOURCE:
            del port["source_frame_size"]
        if not port["iommu"]:
            del port["iotlb_entries"]
        if not port["client"]:
            del port["reconnect_seconds"]
        else:
            for key in ("owner", "group", "socket_mode"):
                port.pop(key, None)
    return raw


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    # JSON string escapes are a subset of TOML basic-string escapes.
    return json.dumps(str(value), ensure_ascii=False)


def format_config(config: DaemonConfig) -> str:
    """TOML text for `config`: what `vhostd` would print as the effective configuration."""
    raw = config_to_dict(config)
    out: list[str] = []

    def table(header: str | None, items: Mapping[str, Any]) -> None:
        scalars = [(k, v) for k, v in items.items() if not isinstance(v, dict | list)]
        if header is not None:
            out.append(f"\n{header}")
        for key, value in scalars:
            if key == "socket_mode":
                out.append(f"{key} = 0o{value:o}")
            else:
                out.append(f"{key} = {_toml_value(value)}")

    table(None, raw)
    table("[metrics]", raw["metrics"])
    table("[switch]", raw["switch"])
    for port in raw["port"]:
        table("[[port]]", port)
        table("[port.features]", port["features"])
    for tap in raw["tap"]:
        table("[[tap]]", tap)
    return "\n".join(out).lstrip("\n") + "\n"


# --- command line --------------------------------------------------------------------


def config_from_args(
    base: DaemonConfig | None = None,
    *,
    sockets: Iterable[str] = (),
    client_sockets: Iterable[str] = (),
    mode: PortMode | str | None = None,
    taps: Iterable[str] = (),
    metrics_listen: str | None = None,
    log_level: str | None = None,
    control_socket: str | None = None,
    source_frame_size: int | None = None,
) -> DaemonConfig:
    """Merge command-line values over `base` (the file's config, or defaults).

    Arguments win: a `--socket` naming a port already in the file keeps that
    port (its name, features, ...) but takes the command line's client flag;
    a new path adds a port named after the file's stem. `mode` applies to every
    port, so `--config f --mode reflect` runs a whole setup as loopback.
    `source_frame_size` applies to the ports named by `sockets` and
    `client_sockets` only (a size suits one test setup, not a whole file).
    `metrics_listen=""` turns the listener off. Relative socket paths are made
    absolute against the current directory. The result is validated like a
    file; problems carry the filename "<command line>" and no line.
    """
    raw = config_to_dict(base if base is not None else DaemonConfig())
    ports: list[dict[str, Any]] = raw["port"]
    by_socket = {os.path.normpath(p["socket"]): p for p in ports}
    named: list[dict[str, Any]] = []
    for path, client in [(s, False) for s in sockets] + [(s, True) for s in client_sockets]:
        full = os.path.normpath(os.path.abspath(path))
        port = by_socket.get(full)
        if port is None:
            port = {"socket": full}
            ports.append(port)
            by_socket[full] = port
        if port.get("client", False) != client:
            port["client"] = client
            for key in ("owner", "group", "socket_mode", "reconnect_seconds"):
                port.pop(key, None)
        named.append(port)
    if mode is not None:
        for port in ports:
            port["mode"] = str(mode)
    for port in ports:
        if port.get("mode") != PortMode.SOURCE:
            port.pop("source_frame_size", None)  # a file's source port made something else
    if source_frame_size is not None:
        for port in named:
            port["source_frame_size"] = source_frame_size
    tap_names = {t["name"] for t in raw["tap"]}
    for name in taps:
        if name not in tap_names:
            raw["tap"].append({"name": name})
            tap_names.add(name)
    if metrics_listen is not None:
        if metrics_listen:
            raw["metrics"]["listen"] = metrics_listen
        else:
            raw["metrics"].pop("listen", None)
    if log_level is not None:
        raw["log_level"] = log_level
    if control_socket is not None:
        raw["control_socket"] = os.path.abspath(control_socket)
    config, problems = _build(raw, KeyLines(), COMMAND_LINE)
    if source_frame_size is not None and not named:
        problems.append(
            ConfigProblem(
                None,
                "",
                "--source-size applies to --socket/--client ports; none given",
                COMMAND_LINE,
            )
        )
    if problems or config is None:
        raise ConfigError(problems)
    return config
