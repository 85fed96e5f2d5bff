"""Ready-made malicious rings, one function per entry of the notes' bad-input list.

Each function writes the descriptors through the raw layer of ``SplitRing``,
publishes them (unless told not to) and returns the head it used, so a test
reads as "post a loop, kick, expect the queue stopped and canaries intact".
Buffers are real, mapped guest RAM unless the point is that they are not.
"""

from __future__ import annotations

from protocol import IotlbPerm

from .guestram import PAGE, GuestRam
from .rings import DESC_SIZE, F_INDIRECT, F_NEXT, F_WRITE, Desc, SplitRing


def _buf(ring: SplitRing, size: int, perm: IotlbPerm, fill: bytes = b"\x00") -> int:
    gpa = ring.ram.alloc(size, 64)
    ring.ram.write(gpa, (fill * size)[:size])
    return ring.dma.map_buffer(gpa, size, perm)


def next_out_of_range(ring: SplitRing, *, publish: bool = True) -> int:
    [head] = ring.take_descs(1)
    ring.write_desc(head, Desc(_buf(ring, 64, IotlbPerm.READ), 64, F_NEXT, ring.size + 3))
    return _publish(ring, head, publish)


def loop(ring: SplitRing, length: int = 2, *, publish: bool = True) -> int:
    """A chain whose last descriptor points back at its head."""
    slots = ring.take_descs(length)
    for k, slot in enumerate(slots):
        ring.write_desc(
            slot, Desc(_buf(ring, 64, IotlbPerm.READ), 64, F_NEXT, slots[(k + 1) % length])
        )
    return _publish(ring, slots[0], publish)


def too_long_chain(ring: SplitRing, *, publish: bool = True) -> int:
    """Every descriptor of the ring chained (size entries, then back to the head).

    No real chain can be longer than the queue; a walker that does not count
    hops spins forever.
    """
    slots = ring.take_descs(ring.size)
    addr = _buf(ring, 64, IotlbPerm.READ)
    for k, slot in enumerate(slots):
        ring.write_desc(slot, Desc(addr, 64, F_NEXT, slots[(k + 1) % len(slots)]))
    return _publish(ring, slots[0], publish)


def head_out_of_range(ring: SplitRing, *, publish: bool = True) -> int:
    head = ring.size + 1
    return _publish(ring, head, publish)


def avail_jump(ring: SplitRing, by: int | None = None) -> int:
    """Move avail idx by more than the queue size (no descriptors behind it)."""
    jump = by if by is not None else ring.size + 1
    ring.set_avail_idx(ring.avail_idx + jump)
    return ring.avail_idx


def indirect(
    ring: SplitRing, table: list[Desc], *, table_len: int | None = None, publish: bool = True
) -> int:
    """An indirect descriptor over ``table``; ``table_len`` overrides its length."""
    gpa = ring.ram.alloc(max(DESC_SIZE * len(table), DESC_SIZE), DESC_SIZE)
    ring.ram.write(gpa, b"".join(d.pack() for d in table))
    addr = ring.dma.map_buffer(gpa, max(DESC_SIZE * len(table), DESC_SIZE), IotlbPerm.READ)
    [head] = ring.take_descs(1)
    length = DESC_SIZE * len(table) if table_len is None else table_len
    ring.write_desc(head, Desc(addr, length, F_INDIRECT, 0))
    return _publish(ring, head, publish)


def indirect_len0(ring: SplitRing) -> int:
    return indirect(ring, [Desc(_buf(ring, 64, IotlbPerm.READ), 64)], table_len=0)


def indirect_len_unaligned(ring: SplitRing) -> int:
    return indirect(ring, [Desc(_buf(ring, 64, IotlbPerm.READ), 64)], table_len=DESC_SIZE + 7)


def indirect_nested(ring: SplitRing) -> int:
    inner_gpa = ring.ram.alloc(DESC_SIZE, DESC_SIZE)
    ring.ram.write(inner_gpa, Desc(_buf(ring, 64, IotlbPerm.READ), 64).pack())
    inner = ring.dma.map_buffer(inner_gpa, DESC_SIZE, IotlbPerm.READ)
    return indirect(ring, [Desc(inner, DESC_SIZE, F_INDIRECT, 0)])


def indirect_loop(ring: SplitRing) -> int:
    """An indirect table whose entries chain in a circle."""
    a = _buf(ring, 64, IotlbPerm.READ)
    return indirect(ring, [Desc(a, 64, F_NEXT, 1), Desc(a, 64, F_NEXT, 0)])


def single(ring: SplitRing, addr: int, length: int, flags: int = 0, *, publish: bool = True) -> int:
    """One descriptor with an arbitrary (device) address: unmapped, half mapped..."""
    [head] = ring.take_descs(1)
    ring.write_desc(head, Desc(addr, length, flags, 0))
    return _publish(ring, head, publish)


def crossing_regions(ring: SplitRing, *, writable: bool = False) -> int:
    """A buffer from the last bytes of one RAM region into the gap after it.

    Only meaningful without a vIOMMU: the descriptor carries a gpa.
    """
    ram: GuestRam = ring.ram
    gap_gpa, _ = ram.gaps()[0]
    start = gap_gpa - 32
    ram.alloc_at(start, 32)
    return single(ring, start, 64 + PAGE, F_WRITE if writable else 0)


def wrong_direction(ring: SplitRing, *, tx: bool) -> int:
    """TX chain with a device-writable buffer, or RX chain with a read-only one."""
    size = 256
    perm = IotlbPerm.RW
    addr = _buf(ring, size, perm, b"\x11")
    return single(ring, addr, size, F_WRITE if tx else 0)


def _publish(ring: SplitRing, head: int, publish: bool) -> int:
    if publish:
        ring.push_heads([head])
    return head
