"""Guest kernel and initramfs, fetched and built once and cached by content.

The kernel is Debian's own (the package linux-image-amd64 points at), extracted with
dpkg instead of installed, so the host is untouched. Only vmlinuz and the virtio-net
modules (plus whatever they depend on) are kept. Builds go into a temporary name and
are renamed into place, and a lock file serialises builders, so concurrent tests and
interrupted runs never see half-built files.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import lzma
import os
import re
import shutil
import subprocess
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.lab.cpio import CpioWriter
from tests.lab.guest_init import INIT_SCRIPT

REPO_ROOT = Path(__file__).resolve().parents[2]
# Modules the guest must load; their dependencies are found from each module's modinfo.
ROOT_MODULES = ("virtio_pci", "virtio_net")
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
APT_LISTS = "/var/lib/apt/lists"
_BUILD_VERSION = "1"  # bump when the initramfs layout changes


@dataclass(frozen=True, slots=True)
class KernelFiles:
    """An extracted guest kernel: vmlinuz, its uncompressed vmlinux, ordered modules."""

    release: str
    vmlinuz: Path
    vmlinux: Path | None  # None when the payload could not be unpacked
    modules: tuple[Path, ...]


@dataclass(frozen=True, slots=True)
class GuestImage:
    """What QEMU's -kernel and -initrd need."""

    kernel: Path
    initrd: Path
    release: str


def cache_dir() -> Path:
    """The lab cache: VHOSTD_LAB_CACHE, else the repo's ignored .cache/lab."""
    path = Path(os.environ.get("VHOSTD_LAB_CACHE") or REPO_ROOT / ".cache" / "lab")
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def _locked(cache: Path) -> Iterator[None]:
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def kernel_package(cache: Path | None = None) -> str | None:
    """The versioned linux-image package apt would install today (None without apt).

    apt-cache takes over a second, so its answer is remembered until apt's package
    lists change (their directory's mtime moves on every apt-get update).
    """
    override = os.environ.get("VHOSTD_LAB_KERNEL_PKG")
    if override:
        return override
    memo = (cache or cache_dir()) / "kernel-package"
    try:
        stamp = str(Path(APT_LISTS).stat().st_mtime_ns)
    except OSError:
        stamp = "none"
    if memo.exists():
        saved_stamp, _, saved = memo.read_text().partition(" ")
        if saved_stamp == stamp and saved.strip():
            return saved.strip()
    try:
        out = subprocess.run(
            ["apt-cache", "depends", "linux-image-amd64"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.search(r"Depends: (linux-image-[0-9]\S*)", out)
    if not match:
        return None
    _write_atomic(memo, f"{stamp} {match.group(1)}\n".encode())
    return match.group(1)


def _write_atomic(dest: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}-")
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, dest)


def _module_name(path: Path) -> str:
    return path.name.split(".ko")[0].replace("-", "_")


def read_module(path: Path) -> bytes:
    """Module bytes, decompressed: busybox insmod may not take .ko.xz/.ko.zst."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        return subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True).stdout
    return data


def _depends(module: bytes) -> list[str]:
    match = re.search(rb"depends=([^\0]*)\0", module)
    if not match or not match.group(1):
        return []
    return [d.decode().replace("-", "_") for d in match.group(1).split(b",")]


def _load_order(index: dict[str, Path], roots: tuple[str, ...]) -> list[Path]:
    """Dependencies before dependants (depth-first post-order)."""
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        if name not in index:
            raise FileNotFoundError(f"kernel module {name} not in the guest kernel package")
        for dep in _depends(read_module(index[name])):
            visit(dep)
        order.append(index[name])

    for root in roots:
        visit(root)
    return order


def _extract_kernel(package: str, dest: Path) -> None:
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".extract-") as tmp:
        work = Path(tmp)
        subprocess.run(["apt-get", "download", package], cwd=work, check=True, capture_output=True)
        (deb,) = work.glob("*.deb")
        tree = work / "tree"
        subprocess.run(["dpkg", "-x", str(deb), str(tree)], check=True)
        vmlinuz = sorted(tree.glob("boot/vmlinuz-*"))[0]
        release = vmlinuz.name.removeprefix("vmlinuz-")
        index = {
            _module_name(p): p for p in tree.glob("**/modules/*/kernel/**/*.ko*") if p.is_file()
        }
        staged = work / "out"
        (staged / "modules").mkdir(parents=True)
        shutil.copy(vmlinuz, staged / "vmlinuz")
        order = []
        for i, path in enumerate(_load_order(index, ROOT_MODULES)):
            name = f"{i:02d}-{path.name}"
            shutil.copy(path, staged / "modules" / name)
            order.append(name)
        (staged / "release").write_text(release + "\n")
        (staged / "modules.order").write_text("\n".join(order) + "\n")
        os.rename(staged, dest)


def unpack_vmlinux(bzimage: bytes) -> bytes | None:
    """The ELF vmlinux inside a bzImage, or None.

    Under TCG, decompressing Debian's xz bzImage takes ~13 s of a ~20 s boot; QEMU boots
    the uncompressed ELF directly through its PVH entry point (CONFIG_PVH) in ~7 s.
    """
    for magic, unpack in (
        (b"\xfd7zXZ\x00", lambda d: lzma.LZMADecompressor().decompress(d)),
        (b"\x28\xb5\x2f\xfd", _unzstd),
        (b"\x1f\x8b\x08", lambda d: zlib.decompressobj(31).decompress(d)),
    ):
        start = bzimage.find(magic)
        if start < 0:
            continue
        try:
            elf = unpack(bzimage[start:])
        except (lzma.LZMAError, zlib.error, OSError, subprocess.CalledProcessError):
            continue
        if elf.startswith(b"\x7fELF") and b"Xen\x00" in elf:  # PVH entry is a Xen ELF note
            return elf
    return None


def _unzstd(data: bytes) -> bytes:
    done = subprocess.run(["zstd", "-dc"], input=data, capture_output=True)
    return done.stdout  # trailing bytes after the frame make zstd complain; output is whole


def _ensure_vmlinux(path: Path) -> None:
    """Unpacks vmlinux once (also for caches made before this existed)."""
    if (path / "vmlinux").exists() or (path / "vmlinux.none").exists():
        return
    elf = unpack_vmlinux((path / "vmlinuz").read_bytes())
    if elf is None:
        (path / "vmlinux.none").touch()
    else:
        _write_atomic(path / "vmlinux", elf)


def _load_kernel(path: Path) -> KernelFiles:
    names = (path / "modules.order").read_text().split()
    if not (path / "vmlinux").exists() and not (path / "vmlinux.none").exists():
        with _locked(path.parent):
            _ensure_vmlinux(path)
    vmlinux = path / "vmlinux"
    return KernelFiles(
        release=(path / "release").read_text().strip(),
        vmlinuz=path / "vmlinuz",
        vmlinux=vmlinux if vmlinux.exists() else None,
        modules=tuple(path / "modules" / n for n in names),
    )


def fetch_kernel(cache: Path | None = None) -> KernelFiles:
    """Downloads and extracts the guest kernel unless the cache has it already."""
    cache = cache or cache_dir()
    package = kernel_package(cache)
    if package is None:
        cached = sorted(cache.glob("kernel-linux-image-*"))
        if not cached:
            raise RuntimeError("no apt to find the guest kernel and nothing cached")
        return _load_kernel(cached[-1])
    dest = cache / f"kernel-{package}"
    if not (dest / "modules.order").exists():
        with _locked(cache):
            if not (dest / "modules.order").exists():
                _extract_kernel(package, dest)
    return _load_kernel(dest)


def find_busybox() -> Path:
    for candidate in BUSYBOX_CANDIDATES:
        path = Path(candidate)
        if path.exists():
            return path
    raise FileNotFoundError("busybox not found (apt-get install busybox-static)")


def _is_static(path: Path) -> bool:
    # A dynamic ELF names its interpreter in a PT_INTERP segment; the path string suffices.
    return b"/lib64/ld-linux" not in path.read_bytes()[:4096]


def build_initramfs(kernel: KernelFiles, cache: Path | None = None) -> Path:
    """An initramfs of busybox + decompressed modules + /init, named by its content hash."""
    cache = cache or cache_dir()
    busybox = find_busybox()
    if not _is_static(busybox):
        raise RuntimeError(f"{busybox} is dynamically linked: install busybox-static")
    modules = [(p.name.split(".ko")[0] + ".ko", read_module(p)) for p in kernel.modules]
    digest = hashlib.sha256(_BUILD_VERSION.encode() + INIT_SCRIPT.encode())
    bb = busybox.read_bytes()
    digest.update(bb)
    for name, data in modules:
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    dest = cache / f"initramfs-{digest.hexdigest()[:16]}.cpio.gz"
    if dest.exists():
        return dest

    archive = CpioWriter()
    for d in ("bin", "dev", "etc", "lib", "lib/modules", "proc", "sys", "tmp"):
        archive.directory(d)
    archive.char_device("dev/console", 5, 1)
    archive.char_device("dev/null", 1, 3)
    archive.file("bin/busybox", bb, 0o755)
    archive.symlink("bin/sh", "busybox")
    archive.file("init", INIT_SCRIPT.encode(), 0o755)
    for name, data in modules:
        archive.file(f"lib/modules/{name}", data)
    archive.file("etc/modules.order", "".join(f"{n}\n" for n, _ in modules).encode())
    blob = gzip.compress(archive.finish(), compresslevel=6, mtime=0)
    _write_atomic(dest, blob)
    return dest


def guest_image(cache: Path | None = None) -> GuestImage:
    """Kernel + initramfs ready for `Guest.start`; instant when cached."""
    kernel = fetch_kernel(cache)
    initrd = build_initramfs(kernel, cache)
    bzimage = os.environ.get("VHOSTD_LAB_KERNEL_FORMAT") == "bzimage"
    boot = kernel.vmlinuz if bzimage or kernel.vmlinux is None else kernel.vmlinux
    return GuestImage(kernel=boot, initrd=initrd, release=kernel.release)
