"""A port: one vhost-user socket, the guest NIC behind it, and its counters.

The port outlives its front-end connections: it listens (or, in client
mode, connects and reconnects), runs one :class:`~vhostd.session.Session`
at a time, and decides where the guest's frames go (the switch, straight
back, or nowhere) and, in source mode, what fills its RX rings. Counters
belong to the port so that they survive a reconnect.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from typing import TYPE_CHECKING

import trio

from protocol import FrontendRequest, VirtioFeature

from .channel import Channel
from .config import PortConfig, PortMode
from .net import BASE_FEATURES, Frame
from .offload import OFFLOAD_FEATURES, PLAIN, VnetHeader
from .runtime import (
    FileId,
    SetupError,
    chown_problem,
    claim_socket_path,
    remove_own_socket,
    resolve_owner,
    user_name,
)
from .session import MISS_TIMEOUT, Session
from .source import Source
from .stats import PortStats
from .switch import Switch

if TYPE_CHECKING:
    from collections.abc import Callable

    from .fastpath import FrameBurst

log = logging.getLogger(__name__)

VF = VirtioFeature

_FEATURE_SWITCHES: tuple[tuple[str, int], ...] = (
    ("mrg_rxbuf", VF.NET_MRG_RXBUF),
    ("event_idx", VF.RING_EVENT_IDX),
    ("indirect_desc", VF.RING_INDIRECT_DESC),
    ("mq", VF.NET_MQ | VF.NET_CTRL_VQ),
    ("mtu", VF.NET_MTU),
    ("status", VF.NET_STATUS),
    ("any_layout", VF.ANY_LAYOUT),
    ("packed", VF.RING_PACKED),
    ("csum", VF.NET_CSUM | VF.NET_HOST_TSO4 | VF.NET_HOST_TSO6 | VF.NET_HOST_ECN),
    ("host_tso", VF.NET_HOST_TSO4 | VF.NET_HOST_TSO6 | VF.NET_HOST_ECN),
    ("guest_csum", VF.NET_GUEST_CSUM | VF.NET_GUEST_TSO4 | VF.NET_GUEST_TSO6 | VF.NET_GUEST_ECN),
    ("guest_tso", VF.NET_GUEST_TSO4 | VF.NET_GUEST_TSO6 | VF.NET_GUEST_ECN),
    ("ecn", VF.NET_HOST_ECN | VF.NET_GUEST_ECN),
)
"""Switches and the feature bits each one turns off (with what depends on them)."""


class Port:
    """One configured vhost-user port."""

    def __init__(self, config: PortConfig, switch: Switch) -> None:
        self.config = config
        self.name = config.name
        self.switch = switch
        self.stats = PortStats()
        self.session: Session | None = None
        self.miss_timeout = MISS_TIMEOUT
        """Seconds a MISS may stay unanswered; tests shorten it, sessions copy it."""
        self.listener: trio.socket.SocketType | None = None
        self._inherited = False
        self._created: FileId | None = None
        """The socket file this port bound (removed at close only if still that file)."""
        self._forward: Callable[[Session, Frame, VnetHeader], None] = {
            PortMode.SWITCH: self._to_switch,
            PortMode.REFLECT: self._reflect,
            PortMode.SINK: _drop,
            PortMode.SOURCE: _drop,
        }[config.mode]
        self.forward_burst: Callable[[Session, FrameBurst], None] | None = {
            PortMode.SWITCH: self._switch_burst,
            PortMode.REFLECT: self._reflect_burst,
        }.get(config.mode)
        """Takes a whole TX burst at once (switch and reflect modes); see ``fastpath``."""
        self.burst_headers = config.mode is PortMode.SWITCH
        """``forward_burst`` takes bursts with offload headers (``FrameBurst.hdrs``)."""
        self.source: Source | None = (
            Source(config.source_frame_size) if config.mode is PortMode.SOURCE else None
        )
        """What fills the guest's RX rings (source mode only); see ``source``."""
        self.cancel_scope = trio.CancelScope()

    # -- what the device offers --------------------------------------------

    def offered_features(self) -> int:
        features = int(BASE_FEATURES | OFFLOAD_FEATURES)
        for name, bits in _FEATURE_SWITCHES:
            if not getattr(self.config.features, name):
                features &= ~bits
        if self.config.queue_pairs < 2:
            features &= ~(VF.NET_MQ | VF.NET_CTRL_VQ)
        if self.config.iommu:
            features |= VF.ACCESS_PLATFORM
        return features

    # -- frames ------------------------------------------------------------

    def attach(self, session: Session) -> None:
        if self.config.mode is PortMode.SWITCH:
            self.switch.attach(session)

    def detach(self, session: Session) -> None:
        self.switch.detach(session)

    def tick(self) -> None:
        self.switch.tick()

    def forward(self, session: Session, frame: Frame, hdr: VnetHeader = PLAIN) -> None:
        """Send a frame the guest transmitted to wherever this port's mode says."""
        self._forward(session, frame, hdr)

    def flush(self) -> None:
        self.switch.flush()

    def _to_switch(self, session: Session, frame: Frame, hdr: VnetHeader) -> None:
        self.switch.forward(session, frame, hdr)

    def _switch_burst(self, session: Session, burst: FrameBurst) -> None:
        self.switch.forward_burst(session, burst)

    def _reflect(self, session: Session, frame: Frame, hdr: VnetHeader = PLAIN) -> None:
        out = bytearray(frame)
        out[0:6], out[6:12] = out[6:12], out[0:6]
        session.send(out, hdr)
        self.switch.touch(session)

    def _reflect_burst(self, session: Session, burst: FrameBurst) -> None:
        """``_reflect`` for each frame; runs that go straight into a ring do so in C."""
        n = len(burst)
        i = session.send_burst(burst, 0, swap=True)
        while i < n:
            self._reflect(session, burst.view(i))  # the frame the batch stopped at
            i += 1
            i += session.send_burst(burst, i, swap=True)
        self.switch.touch(session)

    # -- sockets -------------------------------------------------------------

    def listen(self, inherited: socket.socket | None = None) -> None:
        """Bind the port's socket now, so errors show before the daemon is ready.

        SetupError (one line: this port, the path, the fix) when the path is not
        ours to take (see ``runtime.claim_socket_path``) or the socket cannot be
        made as configured; nothing is left behind then.
        """
        if self.config.client:
            return
        if inherited is not None:
            inherited.setblocking(False)
            self.listener = trio.socket.from_stdlib_socket(inherited)
            self._inherited = True
            return
        path = self.config.socket
        who = f"port {self.name}"
        uid, gid = resolve_owner(self.config.owner, self.config.group, who)
        claim_socket_path(path, who)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        created: FileId | None = None
        try:
            try:
                sock.bind(path)
                created = FileId.of(path)
                os.chmod(path, self.config.socket_mode)
            except OSError as exc:
                fix = "fix socket="
                if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                    fix = f"make {os.path.dirname(path)} writable for user {user_name()} or {fix}"
                problem = f"{who}: cannot create socket {path}: {exc.strerror}: {fix}"
                raise SetupError(problem) from None
            if uid != -1 or gid != -1:
                try:
                    os.chown(path, uid, gid)
                except OSError as exc:
                    raise SetupError(
                        chown_problem(who, path, self.config.owner, self.config.group, exc)
                    ) from None
            sock.listen(4)
        except BaseException:
            sock.close()
            if created is not None:
                remove_own_socket(path, created)
            raise
        sock.setblocking(False)
        self.listener = trio.socket.from_stdlib_socket(sock)
        self._created = created

    async def serve(self) -> None:
        """Accept (or dial) front-ends forever, one session at a time."""
        with self.cancel_scope:
            if self.config.client:
                await self._dial()
            else:
                await self._accept()

    async def _accept(self) -> None:
        assert self.listener is not None
        log.info(
            "%s: listening on %s (mode %s)", self.name, self.config.socket, self.config.mode.value
        )
        while True:
            sock, _ = await self.listener.accept()
            log.info("%s: front-end connected", self.name)
            await self._run_session(sock)

    async def _dial(self) -> None:
        path = self.config.socket
        while True:
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                await sock.connect(path)
            except OSError as exc:
                sock.close()
                if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED):
                    log.warning("%s: connect to %s: %s", self.name, path, exc)
                await trio.sleep(self.config.reconnect_seconds)
                continue
            log.info("%s: connected to front-end at %s", self.name, path)
            await self._run_session(sock)
            await trio.sleep(self.config.reconnect_seconds)

    async def _run_session(self, sock: trio.socket.SocketType) -> None:
        session = Session(self, Channel(sock, FrontendRequest))
        self.session = session
        try:
            await session.run()
        except* (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as lost:
            log.warning("%s: connection lost: %s", self.name, lost.exceptions[0])
        except* Exception:
            # A bug must cost one connection, never the daemon and its other ports;
            # cancellation (the daemon or port stopping) still goes through.
            self.stats.protocol_errors["internal_error"] += 1
            log.exception("%s: session failed", self.name)
        finally:
            self.session = None
            log.info("%s: front-end disconnected", self.name)

    def close(self) -> None:
        """Stop serving and remove the socket file if this port created it.

        A socket systemd passed stays; so does whatever replaced ours at the path.
        """
        self.cancel_scope.cancel()
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self._created is not None:
            remove_own_socket(self.config.socket, self._created)
            self._created = None


def _drop(session: Session, frame: Frame, hdr: VnetHeader) -> None:
    """Sink and source modes: the TX counters already counted the frame."""
