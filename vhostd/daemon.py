"""The daemon: every port, uplink and service task under one nursery.

Stopping is cancellation: SIGINT or SIGTERM cancels the root nursery, each
session's ``finally`` unmaps its memory and closes its fds, and the ports
remove their socket files. SIGHUP re-reads the configuration and applies
what can change without touching a running guest.
"""

from __future__ import annotations

import logging
import signal
import socket
import time
from collections.abc import Callable

import trio

from . import systemd
from .config import DaemonConfig, PortConfig, load_config
from .control import serve_control
from .metrics import serve_metrics
from .port import Port
from .switch import Switch
from .tap import TapUplink

log = logging.getLogger(__name__)

SWITCH_EXPIRE_SECONDS = 10.0


class Daemon:
    """All of vhostd's running state."""

    def __init__(self, config: DaemonConfig, config_path: str | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.switch = Switch(config.switch.mac_ageing_seconds, config.switch.mac_table_size)
        self.ports: dict[str, Port] = {}
        self.taps: list[TapUplink] = []
        self._nursery: trio.Nursery | None = None
        self.reload_hook: Callable[[DaemonConfig], DaemonConfig] | None = None
        self.started_at = time.monotonic()
        self.control_path: str | None = None
        """The control socket, once it listens (None if it could not be created)."""
        self.metrics_address: tuple[str, int] | None = None
        """Where /metrics is served once bound (the real port when 0 was asked)."""

    @property
    def metrics_url(self) -> str | None:
        if self.metrics_address is None:
            return None
        host, port = self.metrics_address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    async def run(self, *, task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled or signalled to stop."""
        inherited = dict(systemd.listen_fds())
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for cfg in self.config.ports:
                    self._add_port(cfg, inherited.pop(cfg.name, None))
                for sock in inherited.values():
                    sock.close()
                for tap_cfg in self.config.taps:
                    tap = TapUplink(tap_cfg.name, self.switch, tap_cfg.mtu)
                    tap.open()
                    self.taps.append(tap)
                    nursery.start_soon(tap.serve)
                nursery.start_soon(self._signals, nursery.cancel_scope)
                nursery.start_soon(self._expire_macs)
                self.control_path = await nursery.start(
                    serve_control, self, self.config.control_socket
                )
                if self.config.metrics.address is not None:
                    self.metrics_address = await nursery.start(
                        serve_metrics, self, self.config.metrics.address
                    )
                await nursery.start(systemd.watchdog_task)
                systemd.ready(f"serving {len(self.ports)} port(s)")
                log.info("vhostd ready: %d port(s), %d tap(s)", len(self.ports), len(self.taps))
                task_status.started(self)
        finally:
            systemd.stopping()
            for port in self.ports.values():
                port.close()
            for tap in self.taps:
                tap.close()
            log.info("vhostd stopped")

    def _add_port(self, cfg: PortConfig, inherited: socket.socket | None = None) -> None:
        assert self._nursery is not None
        port = Port(cfg, self.switch)
        port.listen(inherited)
        self.ports[cfg.name] = port
        self._nursery.start_soon(port.serve)

    def _remove_port(self, name: str) -> None:
        port = self.ports.pop(name, None)
        if port is not None:
            port.close()

    async def _expire_macs(self) -> None:
        while True:
            await trio.sleep(SWITCH_EXPIRE_SECONDS)
            self.switch.expire()

    async def _signals(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    self.reload()
                    continue
                log.info("received %s, stopping", signal.Signals(signum).name)
                scope.cancel()
                return

    def reload(self) -> None:
        """Apply a new configuration file: add and remove ports, refuse the rest."""
        from .config import ConfigError
        from .reload import diff_for_reload

        if self.config_path is None:
            log.warning("SIGHUP: no configuration file to reload")
            return
        systemd.reloading()
        try:
            new = load_config(self.config_path)
            if self.reload_hook is not None:
                new = self.reload_hook(new)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("reload refused: %s", problem)
            systemd.ready()
            return
        plan = diff_for_reload(self.config, new)
        if not plan.ok:
            for reason in plan.refused:
                log.error("reload refused: %s", reason)
            systemd.ready()
            return
        for port_cfg in plan.remove_ports:
            log.info("reload: removing port %s", port_cfg.name)
            self._remove_port(port_cfg.name)
        for port_cfg in plan.add_ports:
            log.info("reload: adding port %s", port_cfg.name)
            self._add_port(port_cfg)
        self.config = new
        systemd.ready(f"serving {len(self.ports)} port(s)")
