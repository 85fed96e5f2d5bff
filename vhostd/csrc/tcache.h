/* The per-queue translation cache: guest address ranges -> local memory.
 *
 * The C loops never translate an address themselves: Python fills this cache
 * from GuestMemory.extent (the one door, which checks the IOTLB and the
 * memory table) and clears it whenever the memory generation moves. A lookup
 * that finds nothing makes the loop stop with VHOSTD_NEED.
 */
#ifndef VHOSTD_TCACHE_H
#define VHOSTD_TCACHE_H

#include "vhostd.h"

#define VHOSTD_TC_PAGES 4096
#define VHOSTD_TC_BIG 0x10000

/* A cached range: [start, last] at local address host, allowed perm. */
struct vhostd_range {
    uint64_t start;
    uint64_t last;     /* inclusive: a range may end at 2**64 */
    uint64_t host;     /* local address of start */
    uint64_t gpa;      /* guest-physical address of start (for the dirty log) */
    uint32_t perm;
    uint32_t epoch;    /* valid while equal to the cache's epoch */
};

/* Large ranges (memory regions without an IOTLB) sit in a few linearly scanned
   slots; small ones (4 KiB IOTLB pages) in a table indexed by page number, so
   a ring whose buffers span hundreds of pages does not thrash. */
struct vhostd_tcache {
    struct vhostd_range big[VHOSTD_TC_SLOTS];
    struct vhostd_range page[VHOSTD_TC_PAGES];
    uint32_t n;
    uint32_t next;
    uint32_t hit;
    uint32_t epoch;
};

static inline int vhostd_in_range(const struct vhostd_range *r, uint64_t a, uint32_t perm)
{
    return r->start <= a && a <= r->last && (r->perm & perm) == perm;
}

/* The cached range holding a with perm, or NULL. */
static inline const struct vhostd_range *vhostd_tc_find(struct vhostd_tcache *c, uint64_t a,
                                                        uint32_t perm)
{
    const struct vhostd_range *r = &c->page[(a >> 12) % VHOSTD_TC_PAGES];
    uint32_t i;
    if (c->epoch && r->epoch == c->epoch && vhostd_in_range(r, a, perm))
        return r;
    i = c->hit;
    if (i < c->n && vhostd_in_range(&c->big[i], a, perm))
        return &c->big[i];
    for (i = 0; i < c->n; i++) {
        if (vhostd_in_range(&c->big[i], a, perm)) {
            c->hit = i;
            return &c->big[i];
        }
    }
    return NULL;
}

/* [a, a+len) fits in r (len >= 1, a in r). */
static inline int vhostd_tc_covers(const struct vhostd_range *r, uint64_t a, uint64_t len)
{
    return len - 1 <= r->last - a;
}

/* The local address of a, which r holds. */
static inline uint8_t *vhostd_tc_host(const struct vhostd_range *r, uint64_t a)
{
    return (uint8_t *)(uintptr_t)(r->host + (a - r->start));
}

#endif
