"""The ``vhostd`` command line.

``vhostd run --socket PATH [--socket PATH ...] [--client PATH ...] [--tap IFNAME]
[--mode switch|reflect|sink|source] [--source-size N] [--config FILE]
[--metrics-listen ADDR] [--control-socket PATH]`` serves ports until SIGINT or SIGTERM;
``vhostd check-config FILE`` (or ``--config FILE``) reports every problem in a configuration file
with its line, then what would stop it on this system; ``vhostd status [--json]
[--fdb] [--control-socket PATH]`` shows what a running daemon is doing (ports, features,
rings, counters, warnings; ``--fdb`` adds the switch's MAC table, which ``vhostd fdb``
shows alone); ``vhostd reload`` makes it re-read its file and prints the verdict;
``vhostd --version`` names the build.

Sockets the service manager passes (socket activation) are ports too, named by
their ``FileDescriptorName=``: with no ``--config`` and no ``--socket``, ``vhostd
run`` under ``systemd-socket-activate`` serves them as switch ports (see
:mod:`vhostd.activation`).

``vhostd run`` exits 0 when stopped, 78 (EX_CONFIG) when the configuration or
what it names on this system must be fixed first (each problem one line on
stderr: the port or TAP, the path, the fix), 1 on an unexpected failure.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

import trio

from .config import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_CONTROL_SOCKET,
    ConfigError,
    DaemonConfig,
    PortMode,
    check_config_text,
    config_from_args,
    load_config,
    parse_config,
)
from .runtime import EX_CONFIG, SetupError


def _parser() -> argparse.ArgumentParser:
    from .buildinfo import describe

    parser = argparse.ArgumentParser(prog="vhostd", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=describe())
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="serve vhost-user ports")
    run.add_argument(
        "--socket",
        action="append",
        default=[],
        metavar="PATH",
        help="listen for a front-end on this Unix socket (repeatable)",
    )
    run.add_argument(
        "--client",
        action="append",
        default=[],
        metavar="PATH",
        help="connect to a front-end listening here, e.g. QEMU server=on",
    )
    run.add_argument(
        "--tap",
        action="append",
        default=[],
        metavar="IFNAME",
        help="join a TAP interface to the switch (repeatable)",
    )
    run.add_argument(
        "--mode",
        choices=[m.value for m in PortMode],
        help="what ports do with frames their guest sends (default switch); source also "
        "fills their guest's RX rings with generated frames",
    )
    run.add_argument(
        "--source-size",
        type=int,
        metavar="N",
        help="bytes per generated frame of the --socket/--client ports in mode source (default 64)",
    )
    run.add_argument(
        "--config",
        metavar="FILE",
        help=f"TOML configuration (default {DEFAULT_CONFIG_PATH} if it exists)",
    )
    run.add_argument(
        "--metrics-listen", metavar="ADDR", help="serve Prometheus metrics on HOST:PORT"
    )
    run.add_argument("--control-socket", metavar="PATH", help="the status socket")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])

    check = sub.add_parser(
        "check-config", help="validate a configuration file and what it needs on this system"
    )
    check.add_argument("file", nargs="?", help=f"the file to check (default {DEFAULT_CONFIG_PATH})")
    check.add_argument(
        "--config",
        dest="config_file",
        metavar="FILE",
        help="the file to check, spelt as for the other commands (instead of FILE)",
    )
    check.add_argument(
        "--syntax-only",
        action="store_true",
        help="check the file alone, not directories, users, TAPs and ports on this system",
    )

    reload = sub.add_parser(
        "reload", help="make the running daemon re-read its configuration; print the verdict"
    )
    _control_socket_args(reload)
    reload.add_argument(
        "--timeout", type=float, default=30.0, metavar="S", help="wait this long for the result"
    )

    fdb = sub.add_parser("fdb", help="show the switch's MAC table: MAC, port, age")
    fdb.add_argument("--json", action="store_true", help="print the entries as JSON")
    _control_socket_args(fdb)

    status = sub.add_parser("status", help="show a running daemon's ports and counters")
    status.add_argument("--fdb", action="store_true", help="also list the switch's MAC table")
    status.add_argument("--json", action="store_true", help="print the raw JSON snapshot")
    _control_socket_args(status)
    return parser


def _control_socket_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--control-socket",
        metavar="PATH",
        help=f"the daemon's control socket (default: from --config, else {DEFAULT_CONTROL_SOCKET})",
    )
    parser.add_argument(
        "--config", metavar="FILE", help=f"read control_socket from here ({DEFAULT_CONFIG_PATH})"
    )


def _overlay(args: argparse.Namespace, base: DaemonConfig | None) -> DaemonConfig:
    """The command line's values over `base`: at start-up and again on every reload."""
    return config_from_args(
        base,
        sockets=args.socket,
        client_sockets=args.client,
        mode=args.mode,
        taps=args.tap,
        metrics_listen=args.metrics_listen,
        log_level=args.log_level,
        control_socket=args.control_socket,
        source_frame_size=args.source_size,
    )


def _read_file(args: argparse.Namespace) -> tuple[DaemonConfig | None, str | None]:
    """The configuration file's contents (None without one) and its path."""
    path = args.config
    if path is None and not (args.socket or args.client) and os.path.exists(DEFAULT_CONFIG_PATH):
        path = DEFAULT_CONFIG_PATH
    return (load_config(path) if path else None), path


def _load(args: argparse.Namespace) -> tuple[DaemonConfig, str | None]:
    """The file (if any) with the command line over it, and the file's path."""
    base, path = _read_file(args)
    return _overlay(args, base), path


def _run(args: argparse.Namespace) -> int:
    from .activation import adopt, take_inherited
    from .daemon import Daemon
    from .logs import setup_logging

    try:
        base, path = _read_file(args)
        # The log level first, so that what taking the passed sockets says is logged.
        setup_logging(_overlay(args, base).log_level)  # journal <N> priorities, or time and level
        inherited = take_inherited()
        # Passed sockets become ports before the command line applies (--mode covers them).
        config = _overlay(args, adopt(base or DaemonConfig(), inherited, path))
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"vhostd: {problem}", file=sys.stderr)
        return EX_CONFIG
    except SetupError as exc:
        for line in exc.problems:
            print(f"vhostd: {line}", file=sys.stderr)
        return EX_CONFIG
    if not config.ports:
        print(
            "vhostd: no ports: give --socket PATH or a --config file, or pass sockets "
            "(systemd socket activation)",
            file=sys.stderr,
        )
        return EX_CONFIG
    try:
        daemon = Daemon(config, path, inherited)
        # A reloaded file must get the same overrides, or every SIGHUP would see
        # e.g. --control-socket "changing" back to the file's value and be refused.
        daemon.reload_hook = lambda new: _overlay(args, new)
        trio.run(daemon.run)
    except KeyboardInterrupt:
        pass
    except SetupError as exc:
        for line in exc.problems:
            print(f"vhostd: {line}", file=sys.stderr)
        return EX_CONFIG
    except OSError as exc:
        logging.getLogger("vhostd").error("cannot start: %s", exc)
        return 1
    return 0


def _check(args: argparse.Namespace) -> int:
    if args.file and args.config_file and args.file != args.config_file:
        print(f"vhostd: check-config: two files given ({args.file}, --config "
              f"{args.config_file}): give one", file=sys.stderr)  # fmt: skip
        return 2
    args.file = args.config_file or args.file or DEFAULT_CONFIG_PATH
    try:
        with open(args.file, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        print(f"vhostd: {exc}", file=sys.stderr)
        return 2
    problems = check_config_text(text, args.file)
    notes: list[str] = []
    if not problems and not args.syntax_only:
        from .preflight import check_system

        problems, notes = check_system(parse_config(text, args.file), text, args.file)
    for problem in problems:
        print(problem)
    if problems:
        return 1
    for note in notes:
        print(f"{args.file}: note: {note}")
    print(f"{args.file}: OK")
    return 0


def _control_socket(args: argparse.Namespace) -> str:
    if args.control_socket:
        return str(args.control_socket)
    path = args.config
    if path is None and os.path.exists(DEFAULT_CONFIG_PATH):
        path = DEFAULT_CONFIG_PATH
    if path is not None:
        try:
            return load_config(path).control_socket
        except (ConfigError, OSError) as exc:
            print(f"vhostd: {path}: {exc}; trying {DEFAULT_CONTROL_SOCKET}", file=sys.stderr)
    return DEFAULT_CONTROL_SOCKET


def _status(args: argparse.Namespace) -> int:
    import json

    from .control import fetch, format_fdb, format_status

    path = _control_socket(args)
    try:
        snap = fetch(path)
    except (OSError, ValueError) as exc:
        print(f"vhostd: cannot read status from {path}: {exc}", file=sys.stderr)
        return 1
    if args.command == "fdb":
        if args.json:
            print(json.dumps(snap.get("fdb", []), indent=2))
        else:
            sys.stdout.write(format_fdb(snap))
    elif args.json:
        print(json.dumps(snap, indent=2))
    else:
        sys.stdout.write(format_status(snap))
        if args.fdb:
            sys.stdout.write("\n" + format_fdb(snap))
    return 0


def _reload(args: argparse.Namespace) -> int:
    from .reload import request_reload

    code, message = request_reload(_control_socket(args), args.timeout)
    print(message, file=sys.stdout if code == 0 else sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        return _run(args)
    if args.command in ("status", "fdb"):
        return _status(args)
    if args.command == "reload":
        return _reload(args)
    return _check(args)


if __name__ == "__main__":
    sys.exit(main())
