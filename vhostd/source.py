"""Source mode: the back-end generates frames into its guest's RX rings.

A source port measures the back-end -> front-end direction on its own: every
buffer the guest posts on an enabled RX ring is filled with one template
frame, as fast as buffers come. Generation goes through the ordinary delivery
path (``RxQueue.deliver``, and ``FastRxQueue.deliver_batch`` over a burst
whose entries all point at the one template), so mergeable buffers, the
IOTLB and every ring check behave as for frames from the switch. The ring
task owns the pacing (``RingLoop.run`` in rings.py): it fills until no buffer is
left, then sleeps until the guest kicks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from .net import BURST, ETH_HLEN

if TYPE_CHECKING:
    from .fastpath import FrameBurst
    from .net import RxQueue

DST_MAC: Final = bytes.fromhex("020000000002")
SRC_MAC: Final = bytes.fromhex("020000000001")
ETHERTYPE: Final = 0x88B5
"""IEEE 802 local experimental ethertype: no stack on the guest acts on it."""


def template(size: int) -> bytes:
    """The frame a source port sends: fixed MACs and ethertype, payload bytes 0, 1, 2, ..."""
    if size < ETH_HLEN:
        raise ValueError(f"a frame of {size} bytes has no room for its Ethernet header")
    payload = bytes(i & 0xFF for i in range(size - ETH_HLEN))
    return DST_MAC + SRC_MAC + ETHERTYPE.to_bytes(2, "big") + payload


class Source:
    """A source port's template frame; hands out one :class:`SourceRing` per ring task."""

    __slots__ = ("frame",)

    def __init__(self, size: int) -> None:
        self.frame = template(size)

    def ring(self, rx: RxQueue) -> SourceRing:
        return SourceRing(self.frame, rx)


class SourceRing:
    """Fills one started RX ring; made when its ring task starts.

    ``stuck`` says the last fill stopped at a buffer too small for the frame
    (a guest without mergeable buffers that posted short ones): the frame is
    dropped and counted, nothing is taken, so trying again before the guest
    does something would only spin.
    """

    __slots__ = ("_batch", "_burst", "_keep", "frame", "rx", "stuck")

    def __init__(self, frame: bytes, rx: RxQueue) -> None:
        self.frame = frame
        self.rx = rx
        self.stuck = False
        self._batch = getattr(rx, "deliver_batch", None)
        self._burst: FrameBurst | None = None
        self._keep: Any = None
        if self._batch is not None:
            self._burst, self._keep = _template_burst(frame)

    def fill(self) -> int:
        """Deliver the template into up to BURST available buffers; returns how many.

        Stops when no buffer is left. Raises what a delivery raises (IotlbMiss
        with nothing of that frame taken, IotlbDenied, QueueError); the caller
        publishes and decides on the interrupt once per call.
        """
        rx = self.rx
        stats = rx.stats
        dropped = stats.dropped
        rx.queue.refresh()
        batch, burst, frame = self._batch, self._burst, self.frame
        done = 0
        self.stuck = False
        while done < BURST:
            if batch is not None:
                # Every entry is the template: starting at ``done`` delivers at most the rest.
                done += batch(burst, False, done, stop_on_drop=True)
                if done >= BURST or stats.dropped != dropped:
                    break
            # The frame the batch stopped at (or every frame without C): decided
            # exactly as any delivery, which is where a miss is raised.
            if not rx.deliver(frame):
                break
            done += 1
            if stats.dropped != dropped:
                break
        self.stuck = stats.dropped != dropped
        return done


def _template_burst(frame: bytes) -> tuple[FrameBurst, Any]:
    """BURST entries pointing at one C copy of ``frame``: no allocation per packet."""
    from .fastpath import FrameBurst
    from .native import ffi

    data = ffi.new("uint8_t[]", frame)
    frames = ffi.new("struct vhostd_frame[]", BURST)
    for i in range(BURST):
        frames[i].ptr = data
        frames[i].len = len(frame)
    return FrameBurst(frames, BURST), data
