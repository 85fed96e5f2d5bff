"""Ready-made malicious packed rings: what a hostile VIRTIO 1.1 driver can write.

Each function writes descriptors through the raw layer of ``PackedRing``
(flags and wrap bits chosen by hand) at the driver's next positions and
makes the chain available by its head's flags last, as a driver would.
Buffers are real, mapped guest RAM unless the point is that they are not.
"""

from __future__ import annotations

from protocol import IotlbPerm

from .badrings import _buf
from .packed import DESC_SIZE, F_AVAIL, F_INDIRECT, F_NEXT, F_USED, F_WRITE, PackedRing, PDesc


def _dir(rx: bool) -> int:
    return F_WRITE if rx else 0


def _perm(rx: bool) -> IotlbPerm:
    return IotlbPerm.WRITE if rx else IotlbPerm.READ


def chain_longer_than_ring(ring: PackedRing, rx: bool = False) -> list[int]:
    """Every position of the ring in one chain, the last one still saying NEXT."""
    addr = _buf(ring, 64, _perm(rx))
    return ring.place([PDesc(addr, 64, 0, F_NEXT | _dir(rx))] * ring.size)


def wrong_wrap(ring: PackedRing, rx: bool = False) -> list[int]:
    """A chain of two whose second descriptor carries the other lap's AVAIL/USED bits
    (a driver that flips descriptors under the device looks the same)."""
    addr = _buf(ring, 64, _perm(rx))
    positions = ring.place(
        [PDesc(addr, 32, 1, F_NEXT | _dir(rx)), PDesc(addr + 32, 32, 1, _dir(rx))]
    )
    second = ring.read_desc(positions[1] & 0x7FFF)
    ring.write_flags(positions[1] & 0x7FFF, second.flags ^ (F_AVAIL | F_USED))
    return positions


def id_out_of_range(ring: PackedRing, rx: bool = False) -> list[int]:
    addr = _buf(ring, 64, _perm(rx))
    return ring.place([PDesc(addr, 64, ring.size, _dir(rx))])  # the first id out of range


def indirect(
    ring: PackedRing, table: list[PDesc], *, table_len: int | None = None, flags: int = 0
) -> list[int]:
    """An indirect descriptor over ``table``; ``table_len`` overrides its length."""
    nbytes = max(DESC_SIZE * len(table), DESC_SIZE)
    gpa = ring.ram.alloc(nbytes, DESC_SIZE)
    ring.ram.write(gpa, b"".join(d.pack() for d in table))
    addr = ring.dma.map_buffer(gpa, nbytes, IotlbPerm.READ)
    length = DESC_SIZE * len(table) if table_len is None else table_len
    return ring.place([PDesc(addr, length, 0, F_INDIRECT | flags)])


def indirect_len_unaligned(ring: PackedRing, rx: bool = False) -> list[int]:
    addr = _buf(ring, 64, _perm(rx))
    return indirect(ring, [PDesc(addr, 64, 0, _dir(rx))], table_len=DESC_SIZE + 7)


def indirect_len0(ring: PackedRing, rx: bool = False) -> list[int]:
    addr = _buf(ring, 64, _perm(rx))
    return indirect(ring, [PDesc(addr, 64, 0, _dir(rx))], table_len=0)


def indirect_nested(ring: PackedRing, rx: bool = False) -> list[int]:
    inner_gpa = ring.ram.alloc(DESC_SIZE, DESC_SIZE)
    ring.ram.write(inner_gpa, PDesc(_buf(ring, 64, _perm(rx)), 64, 0, _dir(rx)).pack())
    inner = ring.dma.map_buffer(inner_gpa, DESC_SIZE, IotlbPerm.READ)
    return indirect(ring, [PDesc(inner, DESC_SIZE, 0, F_INDIRECT)])


def indirect_with_next(ring: PackedRing, rx: bool = False) -> list[int]:
    addr = _buf(ring, 64, _perm(rx))
    return indirect(ring, [PDesc(addr, 64, 0, _dir(rx))], flags=F_NEXT)


def wrong_direction(ring: PackedRing, rx: bool = False) -> list[int]:
    """A TX chain with a device-writable buffer, or an RX chain with a read-only one."""
    addr = _buf(ring, 64, IotlbPerm.RW)
    return ring.place([PDesc(addr, 64, 0, 0 if rx else F_WRITE)])


def single(ring: PackedRing, addr: int, length: int, rx: bool = False) -> list[int]:
    """One descriptor with an arbitrary (device) address: unmapped, half mapped..."""
    return ring.place([PDesc(addr, length, 0, _dir(rx))])
