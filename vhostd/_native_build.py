"""Build script for vhostd's C core, compiled by cffi in API mode at install time.

The C lives in ``vhostd/csrc``, one file per concept (``tcache.c`` the
translation cache, ``ring.c`` the split ring walk, ``packed.c`` the packed
ring walk, ``net.c`` TX bursts and RX delivery, ``switch.c`` the switch's MAC
table and burst delivery, ``guard.c`` the SIGBUS guard over guest memory); the headers in
``HEADERS`` say what Python may call, and their parts between the
``cffi:begin``/``cffi:end`` markers are the cffi declaration as well, so the
two cannot drift apart. Warnings are errors.

API mode (not ABI mode) because the data path needs a real memory fence,
which only a compiler can emit, and because the burst loops must be plain C
to be fast.

``python vhostd/_native_build.py --sanitize`` builds the same sources with
ASan and UBSan as ``vhostd._native_san`` (what ``VHOSTD_SANITIZE=1`` loads,
see ``vhostd/native.py``); it needs the ASan runtime preloaded.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from cffi import FFI

ROOT = Path(__file__).resolve().parent.parent
CSRC = Path("vhostd", "csrc")
"""Relative to the project root, where setuptools runs this (it refuses absolute paths)."""
SOURCES = ("tcache.c", "ring.c", "packed.c", "net.c", "switch.c", "log.c", "guard.c")
HEADERS = ("vhostd.h", "guard.h", "packed.h")
"""The headers Python calls through: each one's cffi-marked part joins the cdef."""
WARNINGS = ["-Wall", "-Wextra", "-Werror", "-Wshadow", "-Wpointer-arith", "-Wvla"]
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]

# What the memory layer calls from libc.
SYSTEM_CDEF = """
    #define PROT_READ ...
    #define PROT_WRITE ...
    #define MAP_SHARED ...
    #define MAP_PRIVATE ...
    #define MAP_ANONYMOUS ...
    #define MAP_FIXED ...
    #define MAP_NORESERVE ...
    #define PROT_NONE ...
    #define MADV_DONTDUMP ...
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset);
    int munmap(void *addr, size_t length);
    int madvise(void *addr, size_t length, int advice);
"""


def api_cdef() -> str:
    """The declarations of every header in ``HEADERS`` between its cffi markers.

    ``struct vhostd_tcache`` is opaque to C callers but Python allocates it,
    so cffi is told to take its size from the compiler.
    """
    bodies = []
    for name in HEADERS:
        text = (ROOT / CSRC / name).read_text()
        bodies.append(text.split("/* cffi:begin */", 1)[1].split("/* cffi:end */", 1)[0])
    return "".join(bodies).replace("struct vhostd_tcache;", "struct vhostd_tcache { ...; };")


def builder(sanitize: bool = False, csrc: Path = CSRC) -> FFI:
    ffi = FFI()
    ffi.cdef(SYSTEM_CDEF + api_cdef())
    flags = ["-std=gnu11", *WARNINGS] + (["-O1", "-g", *SANITIZE] if sanitize else ["-O2"])
    ffi.set_source(
        "vhostd._native_san" if sanitize else "vhostd._native",
        "#include <sys/mman.h>\n"
        + "".join(f'#include "{name}"\n' for name in HEADERS)
        + '#include "tcache.h"\n',
        sources=[str(csrc / name) for name in SOURCES],
        include_dirs=[str(csrc)],
        extra_compile_args=flags,
        extra_link_args=SANITIZE if sanitize else [],
    )
    return ffi


ffibuilder = builder()

if __name__ == "__main__":
    # Outside setuptools: build in a scratch directory, then put the module beside its package.
    with tempfile.TemporaryDirectory() as tmp:
        built = builder("--sanitize" in sys.argv[1:], ROOT / CSRC).compile(tmpdir=tmp)
        shutil.copy(built, ROOT / "vhostd")
