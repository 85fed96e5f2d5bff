"""Configuration loading: every problem reported, each on the right line."""

from __future__ import annotations

from pathlib import Path

import pytest

from vhostd.config import (
    ConfigError,
    ConfigProblem,
    DaemonConfig,
    FeatureConfig,
    MetricsConfig,
    PortConfig,
    PortMode,
    SwitchConfig,
    TapConfig,
    check_config_text,
    config_from_args,
    format_config,
    load_config,
    parse_config,
    parse_listen,
)
from vhostd.iotlb import DEFAULT_CAPACITY
from vhostd.reload import diff_for_reload
from vhostd.tomlpos import KeyLines

REPO = Path(__file__).resolve().parent.parent

GOOD = """\
log_level = "info"
control_socket = "/run/vhostd/control.sock"
[metrics]
listen = "127.0.0.1:9720"
[switch]
mac_ageing_seconds = 300
[[port]]
name = "vm1"
socket = "/run/vhostd/vm1.sock"
mode = "switch"
iommu = true
[port.features]
event_idx = true
[[tap]]
name = "vhostd0"
"""


def one_problem(text: str) -> ConfigProblem:
    problems = check_config_text(text, "t.toml")
    assert len(problems) == 1, problems
    return problems[0]


# (config text, expected line, expected path, fragment of the message)
BROKEN = [
    pytest.param(
        '[[port]]\nsocket = "/run/a.sock"\nmtu = \n',
        3,
        "",
        "TOML syntax error: Invalid value",
        id="syntax-error",
    ),
    pytest.param(
        '[[port]]\nsocket = "/run/a.sock"\nfeatures = [1,\n',
        3,
        "",
        "(at end of file)",
        id="syntax-error-at-eof",
    ),
    pytest.param(
        '[[port]]\nsocket = "/run/a.sock"\nqueue_pair = 2\n',
        3,
        "port[0].queue_pair",
        "unknown key 'queue_pair'; did you mean 'queue_pairs'?",
        id="unknown-key-suggestion",
    ),
    pytest.param(
        '[[port]]\nsocket = "/run/a.sock"\n[port.features]\nevent_index = false\n',
        4,
        "port[0].features.event_index",
        "did you mean 'event_idx'?",
        id="unknown-feature",
    ),
    pytest.param(
        'log_level = "info"\n\n[[ports]]\nsocket = "/run/a.sock"\n',
        3,
        "ports",
        "unknown key 'ports'; did you mean 'port'?",
        id="unknown-table",
    ),
    pytest.param(
        '[[port]]\nsocket = "/run/a.sock"\nmtu = "1500"\n',
        3,
        "port[0].mtu",
        "must be an integer, not a string",
        id="wrong-type",
    ),
    pytest.param(
        '[[port]]\nsocket = "/run/a.sock"\niommu = 1\n',
        3,
        "port[0].iommu",
        "must be true or false, not an integer",
        id="wrong-type-bool",
    ),
    pytest.param(
        '[[port]]\nsocket = "/run/a.sock"\n\nmtu = 65536\n',
        4,
        "port[0].mtu",
        "must be between 68 and 65535, not 65536",
        id="mtu-out-of-range",
    ),
    pytest.param(
        '[[port]]\nsocket = "/run/a.sock"\nqueue_pairs = 9\n',
        3,
        "port[0].queue_pairs",
        "must be between 1 and 8, not 9",
        id="queue-pairs-out-of-range",
    ),
    pytest.param(
        '[[port]]\nname = "vm"\nsocket = "/run/a.sock"\n[[port]]\nname = "vm"\n'
        'socket = "/run/b.sock"\n',
        5,
        "port[1].name",
        "duplicate port name 'vm'; first used by port[0], line 1",
        id="duplicate-name",
    ),
    pytest.param(
        '[[port]]\nsocket = "/run/x/vm.sock"\n[[port]]\nsocket = "/run/y/vm.sock"\n',
        4,
        "port[1].socket",
        "duplicate port name 'vm' (from the socket file's stem)",
        id="duplicate-derived-name",
    ),
    pytest.param(
        '[[port]]\nname = "a"\nsocket = "/run/a.sock"\n[[port]]\nname = "b"\n'
        'socket = "/run//a.sock"\n',
        6,
        "port[1].socket",
        "duplicate socket /run/a.sock; first used by port[0], line 1",
        id="duplicate-socket",
    ),
    pytest.param(
        'control_socket = "/run/a.sock"\n[[port]]\nsocket = "/run/a.sock"\n',
        3,
        "port[0].socket",
        "first used by control_socket, line 1",
        id="socket-is-control-socket",
    ),
    pytest.param(
        '[[port]]\nname = "a"\nsocket = "/run/' + "x" * 100 + '.sock"\n',
        3,
        "port[0].socket",
        "is 110 bytes long; a Unix socket path must be under 108 bytes",
        id="socket-too-long",
    ),
    pytest.param(
        '[[port]]\nsocket = "vm1.sock"\n',
        2,
        "port[0].socket",
        "must be an absolute path",
        id="socket-relative",
    ),
    pytest.param(
        '[[port]]\nsocket = "/run/a.sock"\nmac = "52:54:00:12:34"\n',
        3,
        "port[0].mac",
        "is not a MAC address like 52:54:00:12:34:56",
        id="bad-mac",
    ),
    pytest.param(
        '[[port]]\nsocket = "/run/a.sock"\nmac = "01:00:5e:00:00:01"\n',
        3,
        "port[0].mac",
        "is a multicast address",
        id="multicast-mac",
    ),
    pytest.param(
        '[[port]]\nsocket = "/run/a.sock"\nmode = "bridge"\n',
        3,
        "port[0].mode",
        "must be one of switch, reflect, sink, source, not 'bridge'",
        id="bad-mode",
    ),
    pytest.param(
        '[[tap]]\nname = "vhostd-tap-number-1"\n',
        2,
        "tap[0].name",
        "is longer than 15 bytes (IFNAMSIZ)",
        id="tap-name-too-long",
    ),
    pytest.param(
        '[[tap]]\nname = "tap/0"\n',
        2,
        "tap[0].name",
        "'tap/0' is not a valid interface name",
        id="tap-name-bad-char",
    ),
    pytest.param(
        '[[tap]]\nname = "t0"\n[[tap]]\nname = "t0"\n',
        4,
        "tap[1].name",
        "duplicate tap 't0'; first used by tap[0], line 1",
        id="duplicate-tap",
    ),
    pytest.param(
        '[metrics]\nlisten = "::1:9720"\n',
        2,
        "metrics.listen",
        "put an IPv6 address in brackets, e.g. [::1]:9720",
        id="metrics-ipv6-no-brackets",
    ),
    pytest.param(
        '[metrics]\nlisten = "prometheus.example:9720"\n',
        2,
        "metrics.listen",
        "is not an IPv4 address or 'localhost'",
        id="metrics-hostname",
    ),
    pytest.param(
        '[metrics]\nlisten = "127.0.0.1"\n',
        2,
        "metrics.listen",
        "is not HOST:PORT",
        id="metrics-no-port",
    ),
    pytest.param(
        '[metrics]\nlisten = "127.0.0.1:70000"\n',
        2,
        "metrics.listen",
        "port 70000 is out of range",
        id="metrics-port-range",
    ),
    pytest.param(
        '[[port]]\nname = "a"\nmode = "sink"\n',
        1,
        "port[0].socket",
        "missing required key 'socket'",
        id="missing-socket",
    ),
    pytest.param(
        '[port]\nsocket = "/run/a.sock"\n',
        1,
        "port",
        "must be an array of tables: write [[port]], not [port]",
        id="port-not-array",
    ),
    pytest.param(
        'log_level = "verbose"\n',
        1,
        "log_level",
        "must be one of debug, info, warning, error, critical",
        id="bad-log-level",
    ),
    pytest.param(
        "[switch]\nmac_ageing_seconds = 0\n",
        2,
        "switch.mac_ageing_seconds",
        "must be greater than 0",
        id="ageing-zero",
    ),
    pytest.param(
        '[[port]]\nsocket = "/run/a.sock"\nsocket_mode = "0999"\n',
        3,
        "port[0].socket_mode",
        "must be a permission mode like 0o660",
        id="bad-socket-mode",
    ),
    pytest.param(
        '[[port]]\nsocket = "/run/a.sock"\nclient = true\ngroup = "kvm"\n',
        4,
        "port[0].group",
        "has no effect with client = true",
        id="client-with-group",
    ),
    pytest.param(
        '[[port]]\nsocket = "/run/a.sock"\nqueue_pairs = 2\nfeatures.mq = false\n',
        3,
        "port[0].queue_pairs",
        "needs features.mq = true",
        id="queue-pairs-without-mq",
    ),
    pytest.param(
        '[[port]]\nsocket = "/run/a.sock"\nfeatures = { mq = "no" }\n',
        3,
        "port[0].features.mq",
        "must be true or false",
        id="inline-table-falls-back-to-its-key",
    ),
    pytest.param(
        '[[port]]\nsocket = "/run/a.sock"\n\niotlb_entries = 15\n',
        4,
        "port[0].iotlb_entries",
        "must be between 16 and 1048576, not 15",
        id="iotlb-entries-too-few",
    ),
    pytest.param(
        '[[port]]\nsocket = "/run/a.sock"\niotlb_entries = 1048577\n',
        3,
        "port[0].iotlb_entries",
        "must be between 16 and 1048576, not 1048577",
        id="iotlb-entries-too-many",
    ),
    pytest.param(
        '[[port]]\nsocket = "/run/a.sock"\niotlb_entries = 4096.0\n',
        3,
        "port[0].iotlb_entries",
        "must be an integer, not a float",
        id="iotlb-entries-float",
    ),
    pytest.param(
        '[[port]]\nsocket = "/run/a.sock"\niommu = false\niotlb_entries = 2048\n',
        4,
        "port[0].iotlb_entries",
        "only applies with iommu = true",
        id="iotlb-entries-without-iommu",
    ),
    pytest.param(
        '[[port]]\nsocket = "/run/a.sock"\niotlb_entry = 2048\n',
        3,
        "port[0].iotlb_entry",
        "unknown key 'iotlb_entry'; did you mean 'iotlb_entries'?",
        id="iotlb-entries-misspelt",
    ),
    pytest.param(
        '[[port]]\nsocket = "/run/a.sock"\nmode = "source"\nsource_frame_size = 59\n',
        4,
        "port[0].source_frame_size",
        "must be between 60 and 65535, not 59",
        id="source-frame-too-short",
    ),
    pytest.param(
        '[[port]]\nsocket = "/run/a.sock"\nmode = "source"\nsource_frame_size = "64"\n',
        4,
        "port[0].source_frame_size",
        "must be an integer, not a string",
        id="source-frame-size-string",
    ),
    pytest.param(
        '[[port]]\nsocket = "/run/a.sock"\nmode = "source"\nsource_frame_size = 1519\n',
        4,
        "port[0].source_frame_size",
        "must be at most mtu + 18 = 1518 (the guest is told its MTU is 1500), not 1519",
        id="source-frame-over-default-mtu",
    ),
    pytest.param(
        '[[port]]\nsocket = "/run/a.sock"\nmode = "source"\nmtu = 9000\nsource_frame_size = 9100\n',
        5,
        "port[0].source_frame_size",
        "must be at most mtu + 18 = 9018",
        id="source-frame-over-mtu",
    ),
    pytest.param(
        '[[port]]\nsocket = "/run/a.sock"\nmode = "sink"\nsource_frame_size = 128\n',
        4,
        "port[0].source_frame_size",
        'only applies with mode = "source"',
        id="source-frame-size-without-source-mode",
    ),
]


@pytest.mark.parametrize(("text", "line", "path", "message"), BROKEN)
def test_broken_config_reports_line_and_problem(
    text: str, line: int, path: str, message: str
) -> None:
    problem = one_problem(text)
    assert (problem.line, problem.path) == (line, path), problem
    assert message in problem.message, problem
    assert str(problem).startswith(f"t.toml:{line}: ")


def test_every_problem_is_reported_at_once() -> None:
    text = """\
log_levl = "info"
[metrics]
listen = "localhost"
[[port]]
socket = "/run/vhostd/vm1.sock"
mtu = 20
[port.features]
mqq = true
[[port]]
name = "vm1"
socket = "/run/vhostd/vm1.sock"
mac = "zz:00:00:00:00:01"
mode = "bridge"
[[port]]
queue_pairs = "2"
[[tap]]
name = "averyveryverylongname"
"""
    problems = check_config_text(text, "many.toml")
    found = [(p.line, p.path) for p in problems]
    assert found == [
        (1, "log_levl"),
        (3, "metrics.listen"),
        (6, "port[0].mtu"),
        (8, "port[0].features.mqq"),
        (10, "port[1].name"),  # duplicate name
        (11, "port[1].socket"),  # duplicate socket
        (12, "port[1].mac"),
        (13, "port[1].mode"),
        (14, "port[2].socket"),  # missing: the [[port]] header line
        (15, "port[2].queue_pairs"),
        (17, "tap[0].name"),
    ]
    with pytest.raises(ConfigError) as info:
        parse_config(text, "many.toml")
    assert info.value.problems == problems
    assert str(info.value).splitlines()[0] == (
        "many.toml:1: log_levl: unknown key 'log_levl'; did you mean 'log_level'?"
    )


def test_good_config() -> None:
    config = parse_config(GOOD)
    assert config == DaemonConfig(
        ports=(PortConfig(name="vm1", socket="/run/vhostd/vm1.sock"),),
        taps=(TapConfig(name="vhostd0"),),
        switch=SwitchConfig(mac_ageing_seconds=300.0),
        metrics=MetricsConfig(listen="127.0.0.1:9720"),
    )
    assert config.metrics.address == ("127.0.0.1", 9720)
    assert check_config_text(GOOD) == []


def test_full_config_round_trip() -> None:
    config = DaemonConfig(
        ports=(
            PortConfig(
                name="vm1",
                socket="/run/vhostd/vm1.sock",
                mode=PortMode.REFLECT,
                owner="vhostd",
                group="kvm",
                socket_mode=0o600,
                queue_pairs=2,
                mtu=9000,
                mac="52:54:00:12:34:56",
                iommu=False,
                features=FeatureConfig(event_idx=False, any_layout=False),
            ),
            PortConfig(
                name="peer",
                socket="/run/qemu/peer.sock",
                mode=PortMode.SINK,
                client=True,
                reconnect_seconds=0.5,
                features=FeatureConfig(mq=False),
                queue_pairs=1,
                iotlb_entries=16,
            ),
        ),
        taps=(TapConfig(name="vhostd0", mtu=9000), TapConfig(name="t1")),
        switch=SwitchConfig(mac_ageing_seconds=12.5, mac_table_size=128),
        metrics=MetricsConfig(listen="[::1]:9720"),
        control_socket="/run/vhostd/ctl.sock",
        log_level="debug",
    )
    text = format_config(config)
    assert check_config_text(text) == []
    assert parse_config(text) == config
    assert config.metrics.address == ("::1", 9720)


def test_defaults_and_normalisation() -> None:
    config = parse_config(
        'log_level = "WARNING"\n'
        '[[port]]\nsocket = "/run/vhostd//guest-1.sock"\nmac = "52:54:00:AB:CD:EF"\n'
        'socket_mode = "0600"\n'
        '[[port]]\nsocket = "/run/b.sock"\nfeatures.mq = false\n'
    )
    first, second = config.ports
    assert first.name == "guest-1"  # the socket file's stem
    assert first.socket == "/run/vhostd/guest-1.sock"
    assert first.mac == "52:54:00:ab:cd:ef"
    assert first.socket_mode == 0o600
    assert first.queue_pairs == 4
    assert second.queue_pairs == 1  # no mq: one pair, whatever the default
    assert config.log_level == "warning"
    assert config.metrics.listen is None and config.metrics.address is None


def test_source_port() -> None:
    config = parse_config(
        '[[port]]\nsocket = "/run/a.sock"\nmode = "source"\n'
        '[[port]]\nsocket = "/run/b.sock"\nmode = "source"\nsource_frame_size = 1518\n'
        '[[port]]\nsocket = "/run/c.sock"\nmode = "source"\nmtu = 65535\n'
        "source_frame_size = 65535\n"
    )
    assert [(p.mode, p.source_frame_size) for p in config.ports] == [
        (PortMode.SOURCE, 64),
        (PortMode.SOURCE, 1518),
        (PortMode.SOURCE, 65535),
    ]
    assert parse_config(format_config(config)) == config
    assert "source_frame_size" not in format_config(parse_config(GOOD))  # source ports only


def test_iotlb_entries() -> None:
    config = parse_config(
        '[[port]]\nsocket = "/run/a.sock"\n'
        '[[port]]\nsocket = "/run/b.sock"\niotlb_entries = 16\n'
        '[[port]]\nsocket = "/run/c.sock"\niotlb_entries = 1048576\n'
        '[[port]]\nsocket = "/run/d.sock"\niommu = false\n'
    )
    default = DEFAULT_CAPACITY
    assert [p.iotlb_entries for p in config.ports] == [default, 16, 1 << 20, default]
    text = format_config(config)
    assert parse_config(text) == config
    assert text.count("iotlb_entries") == 3  # not on the port without an IOTLB
    # Kept through the command line's overlay (and so through a reload).
    assert config_from_args(config, mode="sink").ports[1].iotlb_entries == 16


def test_example_file_loads() -> None:
    config = load_config(REPO / "systemd" / "vhostd.toml.example")
    assert [p.name for p in config.ports] == ["vm1", "vm2"]
    assert config.ports[1].client


def test_load_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b'log_level = "info"\n\nname = "\xff"\n')
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert info.value.problems[0].line == 3
    assert "UTF-8" in str(info.value)
    good = tmp_path / "good.toml"
    good.write_text(GOOD)
    assert load_config(good).ports[0].name == "vm1"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9720", ("127.0.0.1", 9720)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("[::]:80", ("::", 80)),
        ("[fe80::1%eth0]:80", ("fe80::1%eth0", 80)),
        ("localhost:9720", ("localhost", 9720)),
    ],
)
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


def test_key_lines_index() -> None:
    lines = KeyLines.scan(
        'a = """\n[[port]]\nname = "x"\n"""\n'  # a multi-line string is not a header
        "[[ port ]]  # first\n"
        "name = 1\n"
        "[ port . features ]\n"
        "'mq' = true\n"
        "[[port]]\n"
        "x.y = 2\n"
    )
    assert lines.line_of("a") == 1
    assert lines.line_of("port[0]") == 5
    assert lines.line_of("port[0].name") == 6
    assert lines.line_of("port[0].features.mq") == 8
    assert lines.line_of("port[0].features.other") == 7
    assert lines.line_of("port[1].x.y") == 10
    assert lines.line_of("port[1].mtu") == 9
    assert lines.line_of("port[2]") == 5  # falls back to the first [[port]]
    assert lines.line_of("tap[0]") is None


# --- command line --------------------------------------------------------------------


def test_config_from_args_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = config_from_args(
        sockets=["vm1.sock", "/run/vm2.sock"],
        client_sockets=["/run/qemu.sock"],
        mode="reflect",
        taps=["tap0"],
        metrics_listen="[::1]:9720",
    )
    assert [(p.name, p.socket, p.client, p.mode) for p in config.ports] == [
        ("vm1", str(tmp_path / "vm1.sock"), False, PortMode.REFLECT),
        ("vm2", "/run/vm2.sock", False, PortMode.REFLECT),
        ("qemu", "/run/qemu.sock", True, PortMode.REFLECT),
    ]
    assert config.taps == (TapConfig("tap0"),)
    assert config.metrics.listen == "[::1]:9720"


def test_config_from_args_over_file() -> None:
    base = parse_config(GOOD)
    config = config_from_args(
        base,
        sockets=["/run/vhostd/vm1.sock", "/run/vhostd/vm2.sock"],
        taps=["vhostd0", "tap1"],
        metrics_listen="",
        log_level="debug",
    )
    assert [p.name for p in config.ports] == ["vm1", "vm2"]
    assert config.ports[0] == base.ports[0]  # same socket: the file's port, kept
    assert [t.name for t in config.taps] == ["vhostd0", "tap1"]
    assert config.metrics.listen is None
    assert config.log_level == "debug"
    # Arguments win: the same socket as a client turns the file's port into one.
    flipped = config_from_args(base, client_sockets=["/run/vhostd/vm1.sock"], mode="sink")
    assert flipped.ports[0].client and flipped.ports[0].mode is PortMode.SINK
    assert flipped.ports[0].name == "vm1"


def test_config_from_args_problems() -> None:
    base = parse_config(GOOD)
    with pytest.raises(ConfigError) as info:
        config_from_args(
            base,
            sockets=["/other/vm1.sock"],
            mode="bounce",
            taps=["x" * 16],
            metrics_listen="9720",
        )
    problems = {(p.path, p.line, p.filename) for p in info.value.problems}
    assert problems == {
        ("metrics.listen", None, "<command line>"),
        ("port[0].mode", None, "<command line>"),
        ("port[1].mode", None, "<command line>"),
        ("port[1].socket", None, "<command line>"),  # duplicate derived name vm1
        ("tap[1].name", None, "<command line>"),
    }


def test_config_from_args_source_size() -> None:
    config = config_from_args(sockets=["/run/a.sock"], mode="source", source_frame_size=1518)
    assert (config.ports[0].mode, config.ports[0].source_frame_size) == (PortMode.SOURCE, 1518)
    # Over a file: only the ports named on the command line take the size.
    base = parse_config(
        '[[port]]\nsocket = "/run/vm1.sock"\nmode = "source"\nsource_frame_size = 100\n'
        '[[port]]\nsocket = "/run/vm2.sock"\nmode = "source"\n'
    )
    config = config_from_args(base, sockets=["/run/vm2.sock"], source_frame_size=200)
    assert [p.source_frame_size for p in config.ports] == [100, 200]
    # A file's source port turned into something else forgets its size.
    assert config_from_args(base, mode="sink").ports[0].source_frame_size == 64
    # Unchanged through a reload's overlay.
    assert config_from_args(config) == config


@pytest.mark.parametrize(
    ("kwargs", "path", "message"),
    [
        ({"mode": "source", "source_frame_size": 20}, "port[0].source_frame_size", "between 60"),
        ({"mode": "reflect", "source_frame_size": 64}, "port[0].source_frame_size", "only"),
        ({"source_frame_size": 64, "sockets": []}, "", "--source-size applies to"),
    ],
)
def test_config_from_args_source_size_problems(
    kwargs: dict[str, object], path: str, message: str
) -> None:
    kwargs = {"sockets": ["/run/a.sock"], **kwargs}
    with pytest.raises(ConfigError) as info:
        config_from_args(**kwargs)  # type: ignore[arg-type]
    [problem] = info.value.problems
    assert (problem.path, problem.line, problem.filename) == (path, None, "<command line>")
    assert message in problem.message


def test_cli_mode_source(tmp_path: Path) -> None:
    from vhostd.cli import _load, _parser

    sock = tmp_path / "s.sock"
    args = _parser().parse_args(["run", "--socket", str(sock), "--mode", "source"])
    config, _ = _load(args)
    assert (config.ports[0].mode, config.ports[0].source_frame_size) == (PortMode.SOURCE, 64)
    args = _parser().parse_args(
        ["run", "--socket", str(sock), "--mode", "source", "--source-size", "1518"]
    )
    assert _load(args)[0].ports[0].source_frame_size == 1518


# --- reload ------------------------------------------------------------------------------


def port(name: str, **kwargs: object) -> PortConfig:
    return PortConfig(name=name, socket=f"/run/vhostd/{name}.sock", **kwargs)  # type: ignore[arg-type]


def test_reload_adds_and_removes_ports_and_taps() -> None:
    old = DaemonConfig(ports=(port("a"), port("b")), taps=(TapConfig("t0"),))
    new = DaemonConfig(ports=(port("b"), port("c")), taps=(TapConfig("t1"),), log_level="debug")
    plan = diff_for_reload(old, new)
    assert plan.ok and not plan.empty
    assert plan.add_ports == [port("c")]
    assert plan.remove_ports == [port("a")]
    assert plan.add_taps == [TapConfig("t1")]
    assert plan.remove_taps == [TapConfig("t0")]
    assert plan.log_level == "debug"


def test_reload_same_config_is_empty() -> None:
    config = parse_config(GOOD)
    plan = diff_for_reload(config, parse_config(GOOD))
    assert plan.ok and plan.empty


def test_reload_refuses_changes_to_a_running_port() -> None:
    old = DaemonConfig(ports=(port("a"),))
    new = DaemonConfig(
        ports=(
            PortConfig(
                name="a",
                socket="/run/vhostd/other.sock",
                mode=PortMode.SINK,
                iotlb_entries=512,
                features=FeatureConfig(event_idx=False),
            ),
        )
    )
    plan = diff_for_reload(old, new)
    assert not plan.ok
    assert plan.refused == [
        "port 'a': changing socket, mode, iotlb_entries, features.event_idx would disconnect "
        "its guest; "
        "remove the port, reload, then add it back (or restart vhostd)"
    ]


def test_reload_refuses_rename_and_global_changes() -> None:
    old = DaemonConfig(ports=(port("a"),), taps=(TapConfig("t0"),))
    renamed = PortConfig(name="b", socket=old.ports[0].socket)
    new = DaemonConfig(
        ports=(renamed,),
        taps=(TapConfig("t0", mtu=9000),),
        metrics=MetricsConfig(listen="127.0.0.1:1"),
        control_socket="/run/vhostd/c2.sock",
        switch=SwitchConfig(mac_table_size=10),
    )
    refused = diff_for_reload(old, new).refused
    assert len(refused) == 5, refused
    assert "renaming port 'a' to 'b'" in refused[0]
    assert refused[1].startswith("tap 't0'")
    assert [r.split(":")[0] for r in refused[2:]] == [
        "metrics.listen",
        "control_socket",
        "switch",
    ]


def test_problem_str_without_line() -> None:
    assert str(ConfigProblem(None, "x", "bad", "f")) == "f: x: bad"
    assert str(ConfigProblem(2, "", "bad")) == "<config>:2: bad"


def test_tap_offloads_switch_parses_and_needs_the_tap_re_added() -> None:
    on = parse_config('[[tap]]\nname = "t0"\n')
    off = parse_config('[[tap]]\nname = "t0"\noffloads = false\n')
    assert on.taps == (TapConfig("t0", offloads=True),)
    assert off.taps == (TapConfig("t0", offloads=False),)
    assert "offloads = false" in format_config(off)
    assert parse_config(format_config(off)) == off
    problem = one_problem('[[tap]]\nname = "t0"\noffloads = "no"\n')
    assert (problem.line, problem.path) == (3, "tap[0].offloads")
    plan = diff_for_reload(on, off)
    assert not plan.ok
    assert plan.refused == ["tap 't0': changing mtu or offloads needs the tap removed and re-added"]
