"""What a TAP opened with ``IFF_VNET_HDR`` takes and gives, without I/O.

With a virtio-net header on every frame, the host kernel is one more
offload-capable peer of the switch:

- frames written to the TAP go through the kernel's
  ``virtio_net_hdr_to_skb``, which takes checksum-partial and TCP GSO frames
  whole, whatever ``TUNSETOFFLOAD`` says: as a receiver the kernel is
  :data:`KERNEL_TAKES` (GUEST_* bits, for :func:`offload.for_receiver`);
- frames read from the TAP carry what the kernel left undone, and only what
  ``TUNSETOFFLOAD`` allowed. vhostd judges them with :data:`KERNEL_SENDS`
  (HOST_* bits, for :func:`offload.check_tx`) like any guest's TX: the
  kernel is trusted no more than a guest.

Which ``TUNSETOFFLOAD`` flags to set is :func:`tun_offload_flags`: the union
of what the TAP's peers on the switch take whole. A frame then reaching a
peer that cannot take it is segmented or checksummed in software, as between
guests; when no peer takes TSO the kernel segments (cheaper than vhostd).
UDP segmentation (USO, ``TUN_F_USO4/6``) is never asked for: vhostd has no
software fallback for it and QEMU 7.2 / Linux 6.1 guests cannot take it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from protocol.enums import VirtioFeature as VF

from .offload import PLAIN, VnetHeader

VNET_HDR_LEN = 12
"""The header size set with TUNSETVNETHDRSZ: virtio 1.0's (num_buffers last, unused here)."""

PLAIN_HEADER = bytes(VNET_HDR_LEN)
"""What a frame without offload carries to the kernel."""

KERNEL_TAKES = VF.NET_GUEST_CSUM | VF.NET_GUEST_TSO4 | VF.NET_GUEST_TSO6 | VF.NET_GUEST_ECN
"""The kernel as a receiver: any valid checksum-partial or TCP GSO header."""

KERNEL_SENDS = VF.NET_CSUM | VF.NET_HOST_TSO4 | VF.NET_HOST_TSO6 | VF.NET_HOST_ECN
"""The kernel as a sender: judged as a guest that negotiated every TCP offload. Not
narrowed to the current TUNSETOFFLOAD flags: frames queued before a change still come."""


class TunOffload(enum.IntFlag):
    """``TUNSETOFFLOAD`` flags (linux/if_tun.h): what the reader of the TAP accepts."""

    CSUM = 0x01
    TSO4 = 0x02
    TSO6 = 0x04
    TSO_ECN = 0x08


NONE = TunOffload(0)


def peer_flags(features: int) -> TunOffload:
    """The TUN flags that one peer with GUEST_* ``features`` could take whole.

    TSO needs the checksum offload too (``offload.receiver_takes``), and the
    kernel ignores TSO flags without TUN_F_CSUM.
    """
    if not features & VF.NET_GUEST_CSUM:
        return NONE
    flags = TunOffload.CSUM
    if features & VF.NET_GUEST_TSO4:
        flags |= TunOffload.TSO4
    if features & VF.NET_GUEST_TSO6:
        flags |= TunOffload.TSO6
    if flags & (TunOffload.TSO4 | TunOffload.TSO6) and features & VF.NET_GUEST_ECN:
        flags |= TunOffload.TSO_ECN
    return flags


def tun_offload_flags(peers: Iterable[int]) -> TunOffload:
    """``TUNSETOFFLOAD`` for a TAP whose switch peers negotiated ``peers`` (GUEST_* bits).

    The union: the kernel leaves an offload undone if any peer takes it
    whole; the others get it finished in software by their own ``send``.
    """
    flags = NONE
    for features in peers:
        flags |= peer_flags(features)
    return flags


def header_bytes(hdr: VnetHeader) -> bytes:
    """The 12 bytes written before a frame (``hdr`` as ``check_tx`` accepted it)."""
    if hdr is PLAIN or hdr == PLAIN:
        return PLAIN_HEADER
    return hdr.pack() + b"\0\0"
