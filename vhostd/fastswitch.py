"""The switch with its MAC table and burst delivery in C (``vhostd/csrc/switch.c``).

:class:`FastSwitch` is a drop-in :class:`~vhostd.switch.Switch`: the same
learning, ageing, capacity, move counting and metrics, kept in a C table so
that a whole TX burst is switched in two C calls, without a Python call per
frame or per destination: ``vhostd_sw_route`` learns and decides every frame
(and lists the ports the burst touches), each touched port readies its RX
rings once (:class:`CPort`), and ``vhostd_sw_deliver`` copies every frame into
its destinations' rings (floods too) or writes it to a TAP fd.

A port C cannot serve from some frame on (no RX buffer, an IOTLB translation
to ask for, a fault, a backlog already waiting, an offload the receiver cannot
take) stops there, and that frame and its later ones for that port go through
``Endpoint.send`` in order: the reference path, which queues, asks the IOTLB,
fails the ring or finishes the offload exactly as for a lone frame. Publishing
and the interrupt decision stay once per burst per destination
(``Switch.flush``). ``VHOSTD_FASTPATH=0`` selects the reference switch.
"""

from __future__ import annotations

import time
from typing import Any, Protocol, runtime_checkable

from protocol.enums import VirtioFeature as VF

from .fastpath import ENABLED, MAX_BURST, FrameBurst
from .native import ffi, lib
from .offload import GSO_ECN, GSO_NONE, GSO_TCPV4, PLAIN, VnetHeader
from .switch import Endpoint, Switch

__all__ = ["CPort", "FastSwitch", "SwitchFull", "make_switch"]

PORTS = lib.VHOSTD_SW_PORTS
FLOOD = lib.VHOSTD_SW_FLOOD
FILTER = lib.VHOSTD_SW_FILTER
KIND_PY, KIND_VHOST, KIND_TAP = lib.VHOSTD_SW_PY, lib.VHOSTD_SW_VHOST, lib.VHOSTD_SW_TAP
NEED = lib.VHOSTD_NEED


@runtime_checkable
class CPort(Protocol):
    """An endpoint C can deliver to: a session's RX rings or a TAP fd.

    ``c_kind`` is ``KIND_VHOST`` or ``KIND_TAP``. Around each burst that
    touches it, ``c_prepare`` fills its ``struct vhostd_sw_port`` (ring
    pointers and indices, or the fd) and says whether C may deliver at all;
    ``c_fill`` answers a stop for a translation C did not have (True: C
    may go on); ``c_finish`` takes back indices and counters and notes what
    to publish.
    """

    c_kind: int

    def c_prepare(self, port: Any) -> bool: ...

    def c_fill(self, port: Any) -> bool: ...

    def c_finish(self, port: Any) -> None: ...


class SwitchFull(RuntimeError):
    """More ports and uplinks than the C switch has room for (``VHOSTD_SW_PORTS``):
    the connection or uplink that asks for one more fails, the others go on."""


class FastSwitch(Switch):
    """``Switch`` with the table and the burst in C; single-threaded like it."""

    def __init__(self, ageing: float = 300.0, table_size: int = 4096) -> None:
        super().__init__(ageing, table_size)
        c = self._c = ffi.new("struct vhostd_switch *")
        self._entries = ffi.new("struct vhostd_fdb_entry[]", table_size + 1)
        nbuckets = 1 << max(4, (2 * table_size - 1).bit_length())
        self._buckets = ffi.new("uint32_t[]", nbuckets)
        lib.vhostd_sw_init(c, self._entries, table_size, self._buckets, nbuckets, ageing)
        c.now = self.now
        self._ids: dict[Endpoint, int] = {}
        self._by_id: list[Endpoint | None] = [None] * PORTS
        self._c_ports: list[CPort | None] = [None] * PORTS
        self._ports = [c.port[i] for i in range(PORTS)]
        """Each port's ``struct vhostd_sw_port``, looked up once."""
        self._dst = ffi.new("uint16_t[]", MAX_BURST)
        self._need = ffi.new("uint64_t[]", MAX_BURST)
        self._keep: list[Any] = []

    # -- the table ---------------------------------------------------------

    @property
    def mac_entries(self) -> int:
        return int(self._c.count)

    @property
    def flooded(self) -> int:
        return int(self._c.flooded) + self._flooded

    @property
    def forwarded(self) -> int:
        return int(self._c.forwarded) + self._forwarded

    @property
    def moves(self) -> int:
        return int(self._c.moves)

    @property
    def filtered(self) -> int:
        return int(self._c.filtered) + self._filtered

    def _id(self, endpoint: Endpoint) -> int:
        """The endpoint's port number in C, given at first sight (attached or not)."""
        got = self._ids.get(endpoint)
        if got is None:
            if len(self._ids) >= PORTS:
                raise SwitchFull(f"the switch takes at most {PORTS} ports and uplinks")
            got = self._by_id.index(None)
            self._ids[endpoint] = got
            self._by_id[got] = endpoint
            port = self._c.port[got]
            port.kind, port.attached, port.nrx, port.stop = KIND_PY, 0, 0, 0
            self._c_ports[got] = None
        return got

    def attach(self, endpoint: Endpoint) -> None:
        if endpoint in self._endpoints:
            return
        n = self._id(endpoint)
        super().attach(endpoint)
        port = self._c.port[n]
        port.attached = 1
        if isinstance(endpoint, CPort) and endpoint.c_kind in (KIND_VHOST, KIND_TAP):
            port.kind = endpoint.c_kind
            self._c_ports[n] = endpoint

    def detach(self, endpoint: Endpoint) -> None:
        """Remove an endpoint and every MAC learnt on it; its C port number is free again."""
        if endpoint in self._endpoints:
            self._endpoints.remove(endpoint)
        n = self._ids.pop(endpoint, None)
        if n is None:
            return
        lib.vhostd_sw_forget(self._c, n)
        port = self._c.port[n]
        port.kind, port.attached, port.nrx, port.stop = KIND_PY, 0, 0, 0
        self._by_id[n] = None
        self._c_ports[n] = None
        self._touched.pop(endpoint, None)
        self._changed()

    def tick(self) -> None:
        self.now = self._c.now = time.monotonic()

    def _route(self, src: Endpoint, smac: bytes, dmac: bytes) -> Endpoint | None:
        if len(smac) < 6 or len(dmac) < 6:
            return None  # never from a ring or a TAP (both drop frames under 14 bytes)
        self._c.now = self.now
        got = lib.vhostd_sw_lookup(self._c, self._id(src), smac, dmac)
        return None if got == FLOOD else self._by_id[got]

    def entries(self, now: float | None = None) -> list[tuple[bytes, Endpoint, float]]:
        now = time.monotonic() if now is None else now
        count = int(self._c.count)
        macs = ffi.new("uint8_t[]", 6 * max(count, 1))
        ports = ffi.new("uint16_t[]", max(count, 1))
        seen = ffi.new("double[]", max(count, 1))
        got = lib.vhostd_sw_dump(self._c, macs, ports, seen, count)
        raw = ffi.buffer(macs, 6 * got)[:]
        live = []
        for k in range(got):
            endpoint = self._by_id[ports[k]]
            if endpoint is not None and now - seen[k] <= self.ageing:
                live.append((raw[6 * k : 6 * k + 6], endpoint, max(0.0, now - seen[k])))
        return sorted(live, key=lambda entry: entry[2])

    def expire(self) -> int:
        return int(lib.vhostd_sw_expire(self._c, time.monotonic() - self.ageing))

    # -- bursts ------------------------------------------------------------

    def forward_burst(self, src: Endpoint, burst: FrameBurst) -> None:
        """Switch a whole burst in C; ports C stops for get the rest through ``send``.

        ``burst.hdrs`` (None: all plain) is each frame's accepted offload
        header; C hands a header on as it is to receivers that negotiated it.
        """
        hdrs = burst.hdrs
        n = len(burst)
        if n > MAX_BURST:  # the per-frame arrays hold MAX_BURST: switch it in parts, in order
            for at in range(0, n, MAX_BURST):
                part = FrameBurst(burst.frames + at, min(MAX_BURST, n - at))
                part.hdrs = None if hdrs is None else hdrs[at : at + MAX_BURST]
                self.forward_burst(src, part)
            return
        if not n:
            return
        c, dst = self._c, self._dst
        sid = self._id(src)
        frames = burst.frames
        need = ffi.NULL if hdrs is None else self._needs(burst, hdrs)
        c.now = self.now
        lib.vhostd_sw_route(c, sid, frames, n, dst)
        ntouched = c.ntouched
        if not ntouched:
            return
        ports, c_ports = self._ports, self._c_ports
        touched = ffi.unpack(c.touched, ntouched)
        for p in touched:
            cp = c_ports[p]
            if cp is not None and not cp.c_prepare(ports[p]):
                ports[p].stop = 0
        lib.vhostd_sw_deliver(c, sid, frames, need, n, dst)
        by_id, notice = self._by_id, self._touched
        for p in touched:
            port = ports[p]
            endpoint = by_id[p]
            assert endpoint is not None
            cp = c_ports[p]
            if cp is not None:
                if port.rc == NEED:
                    self._fill(cp, port, p, sid, frames, need, n)
                cp.c_finish(port)
            stop = port.stop
            if stop < n:
                self._send_rest(endpoint, p, sid, burst, stop, hdrs)
            notice[endpoint] = None

    def _fill(self, cp: CPort, port: Any, p: int, sid: int, frames: Any, need: Any, n: int) -> None:
        """Port ``p`` stopped for a translation: fill its cache and let C go on.

        As many times as the cache has slots (each fill is a new page or
        region); a translation the IOTLB does not have leaves the frames to
        ``send``, which queues them and asks the front-end.
        """
        for _ in range(lib.VHOSTD_TC_SLOTS):
            if not cp.c_fill(port):
                return
            start = port.stop
            port.stop, port.rc = n, 0
            lib.vhostd_sw_resume(self._c, sid, p, start, frames, need, n, self._dst)
            if port.stop >= n or port.rc != NEED:
                return

    def _needs(self, burst: FrameBurst, hdrs: list[VnetHeader]) -> Any:
        """Each frame's header in C (``frames[k].vnet``) and the features taking it needs."""
        need, frames = self._need, burst.frames
        keep = []
        for k, hdr in enumerate(hdrs):
            if hdr is PLAIN:
                need[k] = 0
                continue
            raw = ffi.new("uint8_t[]", hdr.pack())
            keep.append(raw)
            frames[k].vnet = raw
            need[k] = receiver_needs(hdr)
        self._keep = keep  # alive until the next burst (the frames point at them)
        return need

    def _send_rest(
        self,
        endpoint: Endpoint,
        p: int,
        sid: int,
        burst: FrameBurst,
        stop: int,
        hdrs: list[VnetHeader] | None,
    ) -> None:
        """Frames ``stop`` on that went (or flooded) to port ``p``, through ``send``, in order."""
        dst = self._dst
        for k in range(stop, len(burst)):
            d = dst[k]
            if d == p or (d == FLOOD and p != sid):
                endpoint.send(burst.view(k), PLAIN if hdrs is None else hdrs[k])


def receiver_needs(hdr: VnetHeader) -> int:
    """The features a receiver needs to take ``hdr`` as it is (``offload.receiver_takes``)."""
    if hdr.gso_type != GSO_NONE:
        need = int(VF.NET_GUEST_TSO4 if hdr.gso == GSO_TCPV4 else VF.NET_GUEST_TSO6)
        if hdr.gso_type & GSO_ECN:
            need |= int(VF.NET_GUEST_ECN)
        return need | int(VF.NET_GUEST_CSUM)
    if hdr.flags:
        return int(VF.NET_GUEST_CSUM)
    return 0


def make_switch(ageing: float = 300.0, table_size: int = 4096) -> Switch:
    """The switch the daemon runs: in C unless ``VHOSTD_FASTPATH=0``."""
    cls = FastSwitch if ENABLED else Switch
    return cls(ageing, table_size)
