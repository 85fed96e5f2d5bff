"""A minimal cpio "newc" writer, so building the initramfs needs neither root nor cpio(1).

Device nodes (the guest needs /dev/console before devtmpfs is mounted, or init runs
without stdout) can only be made by root with mknod; in an archive they are just a header.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field

_MAGIC = b"070701"


@dataclass(slots=True)
class CpioWriter:
    """Accumulates entries in memory; the initramfs is a few MiB."""

    _chunks: list[bytes] = field(default_factory=list)
    _ino: int = 1

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        encoded = name.encode() + b"\0"
        fields = (
            self._ino,
            mode,
            0,  # uid
            0,  # gid
            1,  # nlink
            0,  # mtime: fixed so equal inputs give equal archives
            len(data),
            0,  # devmajor
            0,  # devminor
            rdev[0],
            rdev[1],
            len(encoded),
            0,  # check
        )
        self._ino += 1
        header = _MAGIC + b"".join(b"%08x" % f for f in fields)
        self._chunks.append(header + encoded)
        self._chunks.append(b"\0" * (-(len(header) + len(encoded)) % 4))
        self._chunks.append(data)
        self._chunks.append(b"\0" * (-len(data) % 4))

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        """Returns the archive including its TRAILER!!! entry."""
        self._entry("TRAILER!!!", 0)
        return b"".join(self._chunks)
