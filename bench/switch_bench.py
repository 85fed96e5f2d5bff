"""In-process packets per second through the switch: frame by frame vs whole bursts.

Guest A's TX ring (a full ring of 64-byte frames to B's MAC, re-offered round
after round as in ``fastpath_bench``) goes through a :class:`Switch` into
guest B's RX ring, either one frame at a time (``Switch.forward``, what a
switch port did before ``forward_burst``) or a burst at a time
(``Switch.forward_burst``: one C delivery per run of frames for B). B is a
small stand-in for a session: ``send``/``send_burst``/``flush`` over one RX
queue, without the daemon around it. CPU time, so other load on the machine
counts less.

    .venv/bin/python -m bench.switch_bench [--seconds 2]
"""

from __future__ import annotations

import argparse
import time

from bench.fastpath_bench import FEATURES, SIZE, dirty_log, queue, setup
from vhostd.fastpath import FastRxQueue, FastTxQueue, FrameBurst
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


def run(batched: bool, seconds: float, log: bool = False) -> float:
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
        switch = Switch()
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
                left -= tx.burst(port._sink)
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
    args = parser.parse_args()
    per_frame = run(False, args.seconds)
    burst = run(True, args.seconds)
    print(
        f"switch A -> B, 64 B: per frame {per_frame / 1e6:.3f} Mpps, "
        f"bursts {burst / 1e6:.3f} Mpps ({burst / per_frame:.2f}x), CPU time"
    )


if __name__ == "__main__":
    main()
