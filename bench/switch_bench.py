"""In-process packets per second through the switch: frame by frame, runs, the C switch.

Guest A's TX ring (a full ring of 64-byte frames to B's MAC, re-offered round
after round as in ``fastpath_bench``) goes through the switch into guest B's
RX ring, either one frame at a time (``Switch.forward``, what a switch port
did before ``forward_burst``), a run at a time (the reference
``Switch.forward_burst``: one C delivery per run of frames for B), or a burst
at a time through the C switch (``FastSwitch``: two C calls per burst), in
bursts of the whole ring or of ``--burst`` frames. B is a small stand-in for
a session: ``send``/``send_burst``/``flush`` and the C switch's
``c_prepare``/``c_finish`` over one RX queue, without the daemon around it.
CPU time, so other load on the machine counts less.

    .venv/bin/python -m bench.switch_bench [--seconds 2]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from bench.fastpath_bench import FEATURES, SIZE, dirty_log, queue, setup
from vhostd.fastpath import FastRxQueue, FastTxQueue, FrameBurst
from vhostd.fastswitch import KIND_VHOST, FastSwitch
from vhostd.net import Frame
from vhostd.offload import PLAIN, VnetHeader
from vhostd.switch import Switch

MAC_A = bytes.fromhex("020000000002")
MAC_B = bytes.fromhex("020000000001")


class Guest:
    """The switch's view of a guest with one RX queue (what ``Session`` does, minus the rest)."""

    def __init__(self, name: str, rx: FastRxQueue | None) -> None:
        self.name = name
        self.rx = rx

    def send(self, frame: Frame, hdr: VnetHeader = PLAIN) -> None:
        if self.rx is not None and not self.rx.deliver(frame, hdr):
            raise AssertionError("the bench RX ring ran out")

    def send_burst(self, burst: FrameBurst, start: int, swap: bool, end: int | None = None) -> int:
        assert self.rx is not None
        return self.rx.deliver_batch(burst, swap, start, 1, 0, end)

    def flush(self) -> None:
        if self.rx is not None:
            self.rx.queue.publish()

    c_kind = KIND_VHOST

    def c_prepare(self, port: Any) -> bool:
        if self.rx is None or not self.rx.switch_ready(port.rx[0]):
            return False
        port.nrx = 1
        return True

    def c_fill(self, port: Any) -> bool:
        return self.rx is not None and self.rx.switch_fill()

    def c_finish(self, port: Any) -> None:
        if port.nrx:
            assert self.rx is not None
            self.rx.switch_done(port.rx[0])
            port.nrx = 0


def run(
    batched: bool, seconds: float, log: bool = False, native: bool = False, burst: int = SIZE
) -> float:
    """Frames per CPU second from A's TX ring into B's RX ring through the switch.

    ``log``: both rings log their writes into a dirty log, as during a migration.
    """
    ram, table, mem, txr, rxr = setup(False)
    dirty = None
    try:
        txq, rxq = queue(mem, txr, 1), queue(mem, rxr, 0)
        if log:
            dirty = dirty_log(table)
            txq.set_log(dirty)
            rxq.set_log(dirty)
        tx = FastTxQueue(txq, FEATURES, 1518)
        rx = FastRxQueue(rxq, FEATURES)
        switch = FastSwitch() if native else Switch()
        port = _Port(switch, batched)
        b = Guest("b", rx)
        switch.attach(b)
        switch.forward(b, MAC_A + MAC_B + bytes(52))  # B speaks: its MAC is learnt
        frames = 0
        clock = time.process_time
        start = clock()
        while clock() - start < seconds:
            rxq.refresh()
            switch.tick()
            left = SIZE
            while left:
                left -= tx.burst(port._sink, min(left, burst))
            switch.flush()
            rxr.set_avail_idx(rxr.avail_idx + SIZE)
            txr.set_avail_idx(txr.avail_idx + SIZE)
            frames += SIZE
        elapsed = clock() - start
        assert tx.stats.packets == frames and rx.stats.packets == frames, (frames, rx.stats)
        assert switch.forwarded == frames
        assert not log or (dirty is not None and dirty.logged > 0)
        return frames / elapsed
    finally:
        if dirty is not None:
            dirty.close()
        table.clear()
        ram.close()


class _Port:
    """What ``fastpath._burst_sink`` looks for: a ``_sink`` whose owner's port may take bursts."""

    def __init__(self, switch: Switch, batched: bool) -> None:
        self.switch = switch
        self.port = self
        self.forward_burst = self._forward_burst if batched else None
        self.a = Guest("a", None)
        switch.attach(self.a)

    def _forward_burst(self, session: object, burst: FrameBurst) -> None:
        self.switch.forward_burst(self.a, burst)

    def _sink(self, frame: memoryview, hdr: VnetHeader) -> None:
        self.switch.forward(self.a, frame, hdr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--burst", type=int, default=32, help="the small TX burst size")
    args = parser.parse_args()
    per_frame = run(False, args.seconds)
    print(f"switch A -> B, 64 B, CPU time: per frame {per_frame / 1e6:.3f} Mpps")
    for size in (SIZE, args.burst):
        runs = run(True, args.seconds, burst=size)
        native = run(True, args.seconds, native=True, burst=size)
        print(
            f"  bursts of {size}: runs {runs / 1e6:.3f} Mpps, "
            f"C switch {native / 1e6:.3f} Mpps ({native / runs:.2f}x)"
        )


if __name__ == "__main__":
    main()
