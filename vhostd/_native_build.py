"""Build script for ``vhostd._native``, compiled by cffi in API mode at install time.

API mode (not ABI mode) because the data path needs a real memory fence, which
only a compiler can emit, and because the burst loops that will live here must
be plain C to be fast.
"""

from cffi import FFI

ffibuilder = FFI()

ffibuilder.cdef(
    """
    #define PROT_READ ...
    #define PROT_WRITE ...
    #define MAP_SHARED ...
    #define MADV_DONTDUMP ...
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset);
    int munmap(void *addr, size_t length);
    int madvise(void *addr, size_t length, int advice);
    void vhostd_fence(void);
    """
)

ffibuilder.set_source(
    "vhostd._native",
    """
    #include <sys/mman.h>

    /* A full barrier: orders the used-index store before the event-index load. */
    static void vhostd_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
    """,
    extra_compile_args=["-O2"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=False)
