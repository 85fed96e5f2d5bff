"""The switch in C (``vhostd/csrc/switch.c``, ``vhostd.fastswitch``) against the reference.

Differential runs (``tests/switch_differential.py``) over fixed seeds, plain
and on hostile rings; proof that those seeds reach the paths that matter
(frames delivered in C, offload headers passed on whole in C, ports C hands
back to ``send``, floods, moves, evictions); the MAC table's own rules; and
a TAP uplink read and written in bursts by C, including refused writes.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from tests.switch_differential import Guest, Uplink, compare_switch, switch_differential
from vhostd import fastpath, fastswitch
from vhostd.fastpath import FrameBurst
from vhostd.fastswitch import FastSwitch
from vhostd.net import Frame
from vhostd.offload import PLAIN, VnetHeader
from vhostd.switch import Switch
from vhostd.tap import TapUplink

SEEDS = 40

pytestmark = pytest.mark.skipif(not fastpath.ENABLED, reason="VHOSTD_FASTPATH=0: no C switch")


@pytest.mark.parametrize("hostile", [False, True], ids=["plain", "hostile"])
@pytest.mark.parametrize("seed", range(SEEDS))
def test_c_switch_agrees_with_the_reference(seed: int, hostile: bool) -> None:
    compare_switch(*switch_differential(seed, hostile))


class _Spy:
    """Counts what the C switch did and what it left to ``send``, over many seeds."""

    def __init__(self, mp: pytest.MonkeyPatch) -> None:
        self.c_frames = self.c_offloads = self.sent = 0
        self.stops: dict[int, int] = {}
        real_done = fastpath.FastRxQueue.switch_done
        real_send = Guest.send
        real_burst = FastSwitch.forward_burst

        def done(rx: fastpath.FastRxQueue, crx: Any) -> bool:
            self.c_frames += int(rx._ring.vq.packets)
            self.c_offloads += int(crx.gso_packets + crx.csum_partial)
            return real_done(rx, crx)

        def send(g: Guest, frame: Frame, hdr: VnetHeader = PLAIN) -> None:
            self.sent += 1
            real_send(g, frame, hdr)

        def burst(sw: FastSwitch, src: Any, b: FrameBurst) -> None:
            real_burst(sw, src, b)
            c = sw._c
            for i in range(c.ntouched):
                port = c.port[c.touched[i]]
                if port.kind == fastswitch.KIND_VHOST and port.stop < len(b):
                    self.stops[int(port.rc)] = self.stops.get(int(port.rc), 0) + 1

        mp.setattr(fastpath.FastRxQueue, "switch_done", done)
        mp.setattr(Guest, "send", send)
        mp.setattr(FastSwitch, "forward_burst", burst)


def test_the_seeds_reach_every_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Agreement proves little if C never delivered or never stopped: it does both."""
    spy = _Spy(monkeypatch)
    moves = flooded = filtered = 0
    for seed in range(SEEDS):
        ref, fast = switch_differential.__wrapped__(seed, False)
        compare_switch(ref, fast)
        _, flood, filt, move, _ = fast["counters"]
        moves, flooded, filtered = moves + move, flooded + flood, filtered + filt
    assert spy.c_frames > 500
    assert spy.c_offloads > 0  # GSO/checksum headers handed on whole by C
    assert spy.sent > 0  # and frames C left to Session.send
    lib = fastswitch.lib
    assert spy.stops.get(lib.VHOSTD_NOBUF, 0) > 0
    assert spy.stops.get(lib.VHOSTD_SLOW, 0) > 0  # an offload the receiver cannot take
    assert spy.stops.get(lib.VHOSTD_FAULT, 0) > 0
    assert moves and flooded and filtered


def _pair() -> tuple[FastSwitch, Switch]:
    return FastSwitch(10.0, 2), Switch(10.0, 2)


def _mac(k: int) -> bytes:
    return bytes([2, 0, 0, 0, 0, k])


def test_table_rules_match_the_reference() -> None:
    """Capacity (oldest out), the one-second refresh, ageing, moves, detach: step by step."""
    tables = []
    for sw in _pair():
        a, b, c = Uplink("a"), Uplink("b"), Uplink("c")
        for ep in (a, b, c):
            sw.attach(ep)
        steps: list[Any] = []

        def say(src: Uplink, dst: bytes, srcmac: bytes, at: float, sw: Switch = sw) -> None:
            sw.now = at
            sw.forward(src, dst + srcmac + bytes(50))

        say(a, b"\xff" * 6, _mac(1), 100.0)
        say(b, _mac(1), _mac(2), 100.5)  # to a; b learnt
        say(a, _mac(2), _mac(1), 101.6)  # refresh: mac 1 is now the newest
        say(c, _mac(1), _mac(3), 101.7)  # table of 2: mac 2 (oldest) goes
        steps.append(sorted(m for m, _, _ in sw.entries(101.7)))
        say(b, _mac(3), _mac(1), 102.0)  # mac 1 moves to b
        steps.append((sw.moves, [(m, ep.name) for m, ep, _ in sw.entries(102.0)]))
        steps.append([m for m, _, _ in sw.entries(112.5)])  # mac 3 aged out of lookups
        say(a, _mac(3), _mac(4), 112.5)  # so this floods
        sw.detach(b)
        steps.append([(m, ep.name) for m, ep, _ in sw.entries(112.5)])
        steps.append((a.got, b.got, c.got, sw.forwarded, sw.flooded, sw.filtered, sw.mac_entries))
        tables.append(steps)
    assert tables[0] == tables[1]
    assert tables[0][1][0] == 1
    assert tables[0][3] == [(_mac(4), "a")]


@pytest.fixture(params=[True, False], ids=["vnet-hdr", "plain"])
def tap_pair(
    request: pytest.FixtureRequest,
) -> Iterator[tuple[TapUplink, socket.socket, FastSwitch]]:
    """A TAP uplink whose fd is one end of a datagram socketpair; the kernel holds the other.

    With offloads (IFF_VNET_HDR) every frame on the fd has a 12-byte header before it.
    """
    switch = FastSwitch()
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    kernel.setblocking(False)
    tap = TapUplink("t0", switch, offloads=request.param)
    tap.fd = ours.detach()
    yield tap, kernel, switch
    os.close(tap.fd)
    kernel.close()


def test_frames_to_the_tap_are_written_by_c_in_order(
    tap_pair: tuple[TapUplink, socket.socket, FastSwitch], monkeypatch: pytest.MonkeyPatch
) -> None:
    tap, kernel, switch = tap_pair
    src = Uplink("src")
    switch.attach(src)
    switch.attach(tap)
    monkeypatch.setattr(TapUplink, "send", _not_called)
    switch.forward(tap, _mac(1) + _mac(9) + bytes(50))  # the host's MAC 9 is learnt on the TAP
    frames = [_mac(9) + _mac(1) + bytes([k]) * 50 for k in range(20)]
    frames += [b"\xff" * 6 + _mac(1) + bytes([99]) * 50]
    burst, keep = FrameBurst.of(frames)
    switch.forward_burst(src, burst)
    del keep
    got = [kernel.recv(2000) for _ in range(21)]
    assert got == [bytes(tap.vnet_len) + f for f in frames]  # a plain header, if any
    assert (tap.tx_packets, tap.tx_bytes, tap.tx_dropped) == (21, 21 * 62, 0)


def _not_called(*args: object) -> None:
    raise AssertionError("the C switch should have written this frame")


def test_refused_tap_writes_are_counted_like_the_reference() -> None:
    """A kernel queue that fills: C counts the refused writes as ``_write`` does."""
    outcome = []
    for sw in (FastSwitch(), Switch()):
        ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        ours.setblocking(False)
        tap = TapUplink("t0", sw)
        tap.fd = ours.detach()
        src = Uplink("src")
        sw.attach(src)
        sw.attach(tap)
        frames = [b"\xff" * 6 + _mac(1) + k.to_bytes(2, "big") * 700 for k in range(400)]
        burst, keep = FrameBurst.of(frames)
        sw.forward_burst(src, burst)
        del keep
        outcome.append((tap.tx_packets, tap.tx_dropped))
        os.close(tap.fd)
        kernel.close()
    assert outcome[0] == outcome[1]
    assert outcome[0][1] > 0


@pytest.mark.trio
async def test_tap_reads_go_to_the_switch_as_one_burst(
    tap_pair: tuple[TapUplink, socket.socket, FastSwitch], monkeypatch: pytest.MonkeyPatch
) -> None:
    tap, kernel, switch = tap_pair
    dst = Uplink("dst")
    switch.attach(dst)
    bursts: list[int] = []
    real = FastSwitch.forward_burst

    def spy(sw: FastSwitch, src: Any, burst: FrameBurst) -> None:
        bursts.append(len(burst))
        real(sw, src, burst)

    monkeypatch.setattr(FastSwitch, "forward_burst", spy)
    frames = [b"\xff" * 6 + _mac(5) + bytes([k]) * 60 for k in range(40)]
    hdr = bytes(tap.vnet_len)
    for f in frames[:20]:
        kernel.send(hdr + f)
    kernel.send(hdr + b"short")  # read and counted, never switched
    for f in frames[20:]:
        kernel.send(hdr + f)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tap.serve)
        with trio.fail_after(5):
            while len(dst.got) < 40:
                await trio.sleep(0.01)
        tap.cancel_scope.cancel()
    assert [f for f, _ in dst.got] == frames
    assert bursts == [40]
    assert (tap.rx_packets, tap.rx_bytes) == (41, 40 * 72 + 5)
    assert switch.flooded == 40


def test_a_full_switch_refuses_one_more_port_and_keeps_the_others() -> None:
    switch = FastSwitch()
    eps = [Uplink(f"u{i}") for i in range(fastswitch.PORTS)]
    for ep in eps:
        switch.attach(ep)
    with pytest.raises(fastswitch.SwitchFull):
        switch.attach(Uplink("one too many"))
    switch.detach(eps[0])
    switch.attach(Uplink("now it fits"))
    switch.forward(eps[1], b"\xff" * 6 + _mac(1) + bytes(50))
    assert len(eps[2].got) == 1 and not eps[0].got


def test_receiver_needs_is_receiver_takes_as_a_feature_mask() -> None:
    """What C checks per receiver (``need`` bits) decides exactly as ``offload.receiver_takes``."""
    from itertools import product

    from protocol.enums import VirtioFeature as VF
    from vhostd.offload import receiver_takes

    bits = [VF.NET_GUEST_CSUM, VF.NET_GUEST_TSO4, VF.NET_GUEST_TSO6, VF.NET_GUEST_ECN]
    headers = [
        VnetHeader(1, 0, 0, 0, 34, 16),
        VnetHeader(1, 1, 54, 1448, 34, 16),
        VnetHeader(1, 4, 74, 1428, 54, 16),
        VnetHeader(1, 0x81, 54, 1448, 34, 16),
        VnetHeader(1, 0x84, 74, 1428, 54, 16),
    ]
    for picks, hdr in product(product([0, 1], repeat=len(bits)), headers):
        features = sum(int(b) for b, on in zip(bits, picks, strict=True) if on)
        need = fastswitch.receiver_needs(hdr)
        assert (features & need == need) == receiver_takes(features, hdr), (hdr, features)
