"""vusim: a vhost-user front-end simulator (QEMU + guest driver + guest vIOMMU) for tests.

Entry point: ``Frontend`` (frontend.py).  Guest memory with canaries lives in
guestram.py, the vIOMMU and its miss policy in viommu.py, split rings in
rings.py, hand-made malicious rings in badrings.py, virtio-net traffic in
net.py.
"""

from .frontend import BackendNack, Frontend, UnexpectedReply
from .guestram import GuestRam, Violation
from .rings import Buffer, Completion, Desc, SplitRing
from .viommu import Granularity, MissMode, MissPolicy, VIommu

__all__ = [
    "BackendNack",
    "Buffer",
    "Completion",
    "Desc",
    "Frontend",
    "Granularity",
    "GuestRam",
    "MissMode",
    "MissPolicy",
    "SplitRing",
    "UnexpectedReply",
    "VIommu",
    "Violation",
]
