"""The daemon: every port, uplink and service task under one nursery.

Starting takes the instance lock (``runtime.InstanceLock``), then binds every
port socket and opens every TAP before any task runs: a problem there is a
:class:`~vhostd.runtime.SetupError` (one line each), everything already made
is undone, and no socket file is left behind.

Stopping is cancellation: SIGINT or SIGTERM cancels the root nursery, each
session's ``finally`` unmaps its memory and closes its fds, and the ports
remove the socket files they created. TAPs stay (persistent) for the next start.

SIGHUP re-reads the configuration and applies it all or nothing: what can fail
(binding new sockets, opening new TAPs) is prepared first and undone if any of
it fails, so a refused reload leaves the daemon exactly as it was.

Sockets the service manager passed (``vhostd.activation``) are ports from start to
exit: every configuration, the first and each reloaded one, gets them through
``activation.adopt``, so a reload can neither remove nor re-bind one.
"""

from __future__ import annotations

import logging
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence

import trio

from . import systemd
from .activation import InheritedSocket, adopt
from .config import ConfigError, DaemonConfig, PortConfig, TapConfig, load_config
from .control import ControlSocket, bind_control, serve_control
from .fastswitch import make_switch
from .metrics import bind_metrics, serve_metrics
from .port import Port
from .reload import ReloadStatus, diff_for_reload
from .runtime import InstanceLock, SetupError, claim_socket_path, runtime_file
from .tap import CreatedTaps, TapUplink, delete_tap

log = logging.getLogger(__name__)

SWITCH_EXPIRE_SECONDS = 10.0


class Daemon:
    """All of vhostd's running state."""

    def __init__(
        self,
        config: DaemonConfig,
        config_path: str | None = None,
        inherited: Sequence[InheritedSocket] = (),
    ) -> None:
        self.inherited = list(inherited)
        """Sockets the service manager passed: each is a port until the daemon exits."""
        # The command line adopted them already (and said so); this makes sure of it.
        config = adopt(config, self.inherited, config_path, quiet=True)
        self.config = config
        self.config_path = config_path
        self.switch = make_switch(config.switch.mac_ageing_seconds, config.switch.mac_table_size)
        self.ports: dict[str, Port] = {}
        self.taps: list[TapUplink] = []
        self._nursery: trio.Nursery | None = None
        self.reload_hook: Callable[[DaemonConfig], DaemonConfig] | None = None
        self.started_at = time.monotonic()
        self.reload_status = ReloadStatus()
        """The last reload's outcome (snapshot ``reload``, ``vhostd_reload_*`` metrics)."""
        self.control_path: str | None = None
        """The control socket, once it listens (None if it could not be created)."""
        self.metrics_address: tuple[str, int] | None = None
        """Where /metrics is served once bound (the real port when 0 was asked)."""
        self.created_taps = CreatedTaps(runtime_file(config.control_socket, ".taps"))
        """TAPs this vhostd created (in this or an earlier run): deleted once unconfigured."""

    @property
    def metrics_url(self) -> str | None:
        if self.metrics_address is None:
            return None
        host, port = self.metrics_address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    async def run(self, *, task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled or signalled to stop; SetupError if it cannot start.

        The signal handlers come first: a SIGTERM while sockets are being bound waits
        for them to be served and is then a clean stop, not a death that leaves them.
        """
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            await self._run(signals, task_status)

    async def _run(self, signals: AsyncIterator[int], task_status: trio.TaskStatus[Daemon]) -> None:
        # By path: adopt() gave each passed socket's port that path (a [[port]] may have
        # configured it by its path, under another name).
        inherited = {inh.path: inh.sock for inh in self.inherited}
        lock = InstanceLock.acquire(self.config.control_socket)
        try:
            self.created_taps = CreatedTaps(runtime_file(self.config.control_socket, ".taps"))
            claim_socket_path(
                self.config.control_socket, "control socket", "control_socket= (--control-socket)"
            )
            ports, taps = self._prepare(self.config.ports, self.config.taps, inherited)
            try:
                control, metrics = self._bind_services()
            except BaseException:
                self._undo(ports, taps)
                raise
            self._delete_unconfigured_taps()
            try:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    for port in ports:
                        self._start_port(port)
                    for tap in taps:
                        self._start_tap(tap)
                    nursery.start_soon(self._signals, signals, nursery.cancel_scope)
                    nursery.start_soon(self._expire_macs)
                    self.control_path = await nursery.start(serve_control, self, control)
                    if metrics is not None:
                        self.metrics_address = await nursery.start(serve_metrics, self, metrics)
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
        finally:
            lock.release()

    def _bind_services(self) -> tuple[ControlSocket, socket.socket | None]:
        """The control socket and the metrics listener (when configured), bound before
        READY: one that cannot be had stops the start (SetupError), as a port does."""
        control = bind_control(self.config.control_socket)
        try:
            address = self.config.metrics.address
            return control, bind_metrics(address) if address is not None else None
        except BaseException:
            control.close()
            raise

    # -- making and undoing ports and taps ------------------------------------------

    def _prepare(
        self,
        port_configs: Iterable[PortConfig],
        tap_configs: Iterable[TapConfig],
        inherited: dict[str, socket.socket],
    ) -> tuple[list[Port], list[TapUplink]]:
        """Bind every port and open every TAP, or undo them all and raise SetupError
        listing every problem found."""
        ports: list[Port] = []
        taps: list[TapUplink] = []
        problems: list[str] = []
        try:
            for cfg in port_configs:
                port = Port(cfg, self.switch)
                try:
                    port.listen(None if cfg.client else inherited.pop(cfg.socket, None))
                except SetupError as exc:
                    problems += exc.problems
                    continue
                except OSError as exc:  # not foreseen by listen(): still one line
                    problems.append(f"port {cfg.name}: {cfg.socket}: {exc.strerror or exc}")
                    continue
                ports.append(port)
            for tap_cfg in tap_configs:
                tap = TapUplink(tap_cfg.name, self.switch, tap_cfg.mtu, offloads=tap_cfg.offloads)
                try:
                    tap.open()
                except SetupError as exc:
                    problems += exc.problems
                    continue
                except OSError as exc:
                    problems.append(f"tap {tap_cfg.name}: {exc.strerror or exc}")
                    continue
                if tap.created:
                    self.created_taps.add(tap.name)
                taps.append(tap)
            if problems:
                raise SetupError(problems)
        except BaseException:
            self._undo(ports, taps)
            raise
        return ports, taps

    def _undo(self, ports: list[Port], taps: list[TapUplink]) -> None:
        for port in ports:
            port.close()
        for tap in taps:
            tap.close(delete=tap.created)
            if tap.created:
                self.created_taps.discard(tap.name)

    def _start_port(self, port: Port) -> None:
        assert self._nursery is not None
        self.ports[port.name] = port
        self._nursery.start_soon(port.serve)

    def _start_tap(self, tap: TapUplink) -> None:
        assert self._nursery is not None
        self.taps.append(tap)
        self._nursery.start_soon(tap.serve)
        log.info("tap %s: up (%s)", tap.name, "created" if tap.created else "attached")

    def _remove_port(self, name: str) -> None:
        port = self.ports.pop(name, None)
        if port is not None:
            port.close()

    def _remove_tap(self, name: str) -> bool:
        """Detach the TAP; delete the interface if vhostd created it. True if deleted."""
        for tap in self.taps:
            if tap.name == name:
                self.taps.remove(tap)
                ours = name in self.created_taps.names
                tap.close(delete=ours)
                self.created_taps.discard(name)
                if ours:
                    log.info("tap %s: deleted (vhostd created it)", name)
                return ours
        return False

    def _delete_unconfigured_taps(self) -> None:
        """TAPs an earlier run created that the configuration no longer has."""
        configured = {t.name for t in self.config.taps}
        for name in sorted(self.created_taps.names - configured):
            try:
                delete_tap(name)
            except OSError as exc:
                log.warning("tap %s: vhostd created it and it is no longer configured, but "
                            "cannot delete it: %s", name, exc.strerror)  # fmt: skip
            else:
                log.info("tap %s: deleted (vhostd created it; no longer configured)", name)
            self.created_taps.discard(name)

    # -- service tasks -------------------------------------------------------------

    async def _expire_macs(self) -> None:
        while True:
            await trio.sleep(SWITCH_EXPIRE_SECONDS)
            self.switch.expire()

    async def _signals(self, signals: AsyncIterator[int], scope: trio.CancelScope) -> None:
        async for signum in signals:
            if signum == signal.SIGHUP:
                self.reload()
                continue
            log.info("received %s, stopping", signal.Signals(signum).name)
            scope.cancel()
            return

    # -- reload ----------------------------------------------------------------------

    def reload(self) -> bool:
        """Re-read the configuration file and apply it whole, or refuse it whole.

        Every outcome is logged ("reload applied: ..." or one "reload refused: ..."
        line per problem) and recorded in ``reload_status``. True when applied.
        """
        systemd.reloading()
        try:
            changes = self._reload()
        except Exception as exc:
            # A bug in a reload must cost that reload, never the running guests.
            problems = exc.problems if isinstance(exc, SetupError) else [f"internal error: {exc!r}"]
            if not isinstance(exc, SetupError):
                log.exception("reload failed")
            for problem in problems:
                log.error("reload refused: %s", problem)
            log.error("the previous configuration stays in force")
            self.reload_status.refused(problems)
            systemd.ready(f"serving {len(self.ports)} port(s); last reload refused")
            return False
        self.reload_status.applied(changes)
        log.info("reload applied: %s", ", ".join(changes) or "nothing changed")
        systemd.ready(f"serving {len(self.ports)} port(s)")
        return True

    def _reload(self) -> list[str]:
        if self.config_path is None:
            raise SetupError("vhostd was started without --config: there is no file to reload")
        try:
            new = load_config(self.config_path)
            new = adopt(new, self.inherited, self.config_path, quiet=True)
            if self.reload_hook is not None:
                new = self.reload_hook(new)
        except ConfigError as exc:
            raise SetupError([str(p) for p in exc.problems]) from None
        plan = diff_for_reload(self.config, new)
        passed = {inh.path for inh in self.inherited}
        for port_cfg in plan.remove_ports if plan.ok else ():
            if port_cfg.socket in passed:  # adopt() keeps them: only a bug gets here
                plan.refused.append(
                    f"port {port_cfg.name}: its socket was passed by the service manager and "
                    "stays a port until vhostd stops"
                )
        if not plan.ok:
            raise SetupError(plan.refused)
        ports, taps = self._prepare(plan.add_ports, plan.add_taps, {})
        # Nothing below can fail: the reload is committed.
        changes: list[str] = []
        for port_cfg in plan.remove_ports:
            log.info("reload: removing port %s", port_cfg.name)
            self._remove_port(port_cfg.name)
            changes.append(f"removed port {port_cfg.name}")
        for tap_cfg in plan.remove_taps:
            log.info("reload: removing tap %s", tap_cfg.name)
            deleted = self._remove_tap(tap_cfg.name)
            changes.append(f"removed tap {tap_cfg.name}" + (" (deleted)" if deleted else ""))
        for port in ports:
            log.info("reload: adding port %s", port.name)
            self._start_port(port)
            changes.append(f"added port {port.name}")
        for tap in taps:
            log.info("reload: adding tap %s", tap.name)
            self._start_tap(tap)
            changes.append(f"added tap {tap.name}" + (" (created)" if tap.created else ""))
        if plan.log_level is not None:
            logging.getLogger().setLevel(plan.log_level.upper())
            changes.append(f"log_level {plan.log_level}")
        self.config = new
        return changes
