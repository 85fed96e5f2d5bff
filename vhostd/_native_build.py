"""Build script for ``vhostd._native``, compiled by cffi in API mode at install time.

API mode (not ABI mode) because the data path needs a real memory fence, which
only a compiler can emit, and because the burst loops that live here must be
plain C to be fast.

The burst loops (``vhostd_tx_burst``, ``vhostd_rx_deliver`` and its per-burst
``vhostd_rx_deliver_batch``) mirror ``SplitQueue.walk``, ``TxQueue.burst`` and
``RxQueue.deliver`` check for check.
They never translate an address themselves: every guest buffer they touch must
lie inside a range of a per-queue cache (``struct vhostd_tcache``) that
Python filled from ``GuestMemory.extent`` (the one door) and clears whenever the
memory generation changes. A lookup that finds nothing stops the loop before
the chain (nothing of it taken) with ``VHOSTD_NEED`` and the address, so Python
asks the door and calls again. Anything whose exact outcome depends on how the
Python reference splits views returns ``VHOSTD_SLOW``: Python then runs the
reference for that one chain. Ring indices live in ``SplitQueue``; they are
copied into ``struct vhostd_vq`` for the duration of a call and copied back.
"""

from cffi import FFI

ffibuilder = FFI()

# The structs Python and C both see: declared once, for the cdef and the source.
SHARED = """
struct vhostd_piece { uint8_t *ptr; uint32_t len; };
struct vhostd_frame { uint8_t *ptr; uint32_t len; };
struct vhostd_head { uint32_t id; uint32_t got; };
struct vhostd_vq {
    uint8_t *desc;
    uint8_t *avail;
    uint8_t *used;
    uint32_t size;
    uint32_t indirect;
    uint64_t max_chain_bytes;
    uint16_t last_avail;
    uint16_t last_used;
    uint32_t fault;
    uint64_t f_head;
    uint64_t f_value;
    uint64_t f_limit;
    uint64_t need_addr;
    uint32_t need_perm;
    uint64_t packets;
    uint64_t bytes;
    uint64_t dropped;
    uint64_t bad_header;
    struct vhostd_piece *pieces;
    uint32_t max_pieces;
    struct vhostd_head *heads;
    uint32_t max_heads;
    uint8_t *scratch;
    uint64_t scratch_len;
};
"""

CDEF = (
    """
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
    void vhostd_fence(void);

    #define VHOSTD_TC_SLOTS ...
    #define VHOSTD_DONE ...
    #define VHOSTD_NEED ...
    #define VHOSTD_FAULT ...
    #define VHOSTD_SLOW ...
    #define VHOSTD_FULL ...
    #define VHOSTD_NOBUF ...
    #define VHOSTD_DROPPED ...
    #define VHOSTD_OTHER ...

    struct vhostd_tcache { ...; };
"""
    + SHARED
    + """

    void vhostd_tc_clear(struct vhostd_tcache *c);
    void vhostd_tc_insert(struct vhostd_tcache *c, uint64_t addr, uint64_t start,
                          uint64_t last, uint64_t host, uint32_t perm);
    void vhostd_publish(struct vhostd_vq *q);
    int vhostd_tx_burst(struct vhostd_vq *q, struct vhostd_tcache *c, uint32_t limit,
                        uint32_t hdr_len, uint32_t max_frame, int collect,
                        struct vhostd_frame *frames, uint32_t *nframes, uint32_t *done);
    int vhostd_rx_deliver(struct vhostd_vq *q, struct vhostd_tcache *c,
                          const uint8_t *frame, uint32_t flen, int mergeable,
                          uint32_t hdr_len, const uint8_t *hdr);
    int vhostd_rx_deliver_batch(struct vhostd_vq *q, struct vhostd_tcache *c,
                                const struct vhostd_frame *frames, uint32_t n, int mergeable,
                                uint32_t hdr_len, const uint8_t *hdr, int swap,
                                uint32_t nsel, uint32_t want, uint32_t *done);
    uint32_t vhostd_mac_run(const struct vhostd_frame *frames, uint32_t start, uint32_t n);
"""
)

SOURCE = r"""
#include <sys/mman.h>
#include <stdint.h>
#include <string.h>

/* A full barrier: orders the used-index store before the event-index load. */
static void vhostd_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

#define VHOSTD_TC_SLOTS 32
#define VHOSTD_TC_PAGES 4096
#define VHOSTD_TC_BIG 0x10000

/* Return codes of the burst functions. */
#define VHOSTD_DONE 0      /* finished what was asked */
#define VHOSTD_NEED 1      /* need_addr/need_perm not in the cache; nothing of that chain taken */
#define VHOSTD_FAULT 2     /* the driver broke the ring: fault, f_head, f_value, f_limit */
#define VHOSTD_SLOW 3      /* let the Python reference take the next chain */
#define VHOSTD_FULL 4      /* TX collect: scratch space used up; call again */
#define VHOSTD_NOBUF 5     /* RX: no (or not enough) buffers; nothing taken */
#define VHOSTD_DROPPED 6   /* RX: frame dropped (chain too small); nothing taken */
#define VHOSTD_OTHER 7     /* RX batch: the next frame hashes to another RX queue */

/* Fault codes, in QueueFault order. */
enum { F_HEAD_RANGE = 1, F_NEXT_RANGE, F_LOOP, F_AVAIL_JUMP, F_INDIRECT_LEN,
       F_INDIRECT_NESTED, F_INDIRECT_NEXT, F_INDIRECT_OFF, F_DIRECTION, F_TOO_LONG };

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define DESC_F_INDIRECT 4
#define MAX_QUEUE_SIZE 32768
#define MIN_FRAME 14

/* A cached range: [start, last] at local address host, allowed perm. */
struct range {
    uint64_t start;
    uint64_t last;     /* inclusive: a range may end at 2**64 */
    uint64_t host;     /* local address of start */
    uint32_t perm;
    uint32_t epoch;    /* valid while equal to the cache's epoch */
};
/* Large ranges (memory regions without an IOTLB) sit in a few linearly scanned
   slots; small ones (4 KiB IOTLB pages) in a table indexed by page number, so
   a ring whose buffers span hundreds of pages does not thrash. */
struct vhostd_tcache {
    struct range big[VHOSTD_TC_SLOTS];
    struct range page[VHOSTD_TC_PAGES];
    uint32_t n;
    uint32_t next;
    uint32_t hit;
    uint32_t epoch;
};
/* SHARED */
struct desc { uint64_t addr; uint32_t len; uint16_t flags; uint16_t next; };

static void vhostd_tc_clear(struct vhostd_tcache *c)
{
    c->n = c->next = c->hit = 0;
    if (++c->epoch == 0) {       /* wrapped: forget every page slot for real */
        memset(c->page, 0, sizeof c->page);
        c->epoch = 1;
    }
}

static void vhostd_tc_insert(struct vhostd_tcache *c, uint64_t addr, uint64_t start,
                             uint64_t last, uint64_t host, uint32_t perm)
{
    struct range *r;
    if (c->epoch == 0)
        c->epoch = 1;
    if (last - start >= VHOSTD_TC_BIG) {
        uint32_t i;
        if (c->n < VHOSTD_TC_SLOTS) {
            i = c->n++;
        } else {
            i = c->next;
            c->next = (c->next + 1) % VHOSTD_TC_SLOTS;
        }
        c->hit = i;
        r = &c->big[i];
    } else {
        r = &c->page[(addr >> 12) % VHOSTD_TC_PAGES];
    }
    r->start = start;
    r->last = last;
    r->host = host;
    r->perm = perm;
    r->epoch = c->epoch;
}

static inline int in_range(const struct range *r, uint64_t a, uint32_t perm)
{
    return r->start <= a && a <= r->last && (r->perm & perm) == perm;
}

/* The cached range holding a with perm, or NULL. */
static inline const struct range *tc_find(struct vhostd_tcache *c, uint64_t a, uint32_t perm)
{
    const struct range *r = &c->page[(a >> 12) % VHOSTD_TC_PAGES];
    uint32_t i;
    if (c->epoch && r->epoch == c->epoch && in_range(r, a, perm))
        return r;
    i = c->hit;
    if (i < c->n && in_range(&c->big[i], a, perm))
        return &c->big[i];
    for (i = 0; i < c->n; i++) {
        if (in_range(&c->big[i], a, perm)) {
            c->hit = i;
            return &c->big[i];
        }
    }
    return NULL;
}

/* [a, a+len) fits in r (len >= 1, a in r). */
static inline int tc_covers(const struct range *r, uint64_t a, uint64_t len)
{
    return len - 1 <= r->last - a;
}

static inline int fault(struct vhostd_vq *q, uint32_t kind, uint64_t head, uint64_t value,
                        uint64_t limit)
{
    q->fault = kind;
    q->f_head = head;
    q->f_value = value;
    q->f_limit = limit;
    return VHOSTD_FAULT;
}

static inline int need(struct vhostd_vq *q, uint64_t addr, uint32_t perm)
{
    q->need_addr = addr;
    q->need_perm = perm;
    return VHOSTD_NEED;
}

static void vhostd_publish(struct vhostd_vq *q)
{
    __atomic_store_n((uint16_t *)(q->used + 2), q->last_used, __ATOMIC_RELEASE);
}

static inline int avail_count(struct vhostd_vq *q, uint32_t *n)
{
    uint16_t idx = __atomic_load_n((uint16_t *)(q->avail + 2), __ATOMIC_ACQUIRE);
    uint32_t k = (uint16_t)(idx - q->last_avail);
    if (k > q->size)
        return fault(q, F_AVAIL_JUMP, q->last_avail, k, q->size);
    *n = k;
    return VHOSTD_DONE;
}

static inline int head_at(struct vhostd_vq *q, uint32_t nth, uint32_t *head)
{
    uint16_t h;
    uint32_t slot = (uint32_t)(uint16_t)(q->last_avail + nth) % q->size;
    memcpy(&h, q->avail + 4 + 2 * (size_t)slot, 2);
    if (h >= q->size)
        return fault(q, F_HEAD_RANGE, h, h, q->size);
    *head = h;
    return VHOSTD_DONE;
}

static inline void put(struct vhostd_vq *q, uint32_t head, uint32_t written)
{
    uint32_t elem[2] = {head, written};
    memcpy(q->used + 4 + 8 * (size_t)(q->last_used % q->size), elem, 8);
    q->last_used++;
    q->last_avail++;
}

/* SplitQueue.walk: append the chain's pieces to q->pieces from *np on. */
static int walk(struct vhostd_vq *q, struct vhostd_tcache *c, uint32_t head, int writable,
                uint32_t *np, uint64_t *total_out, uint32_t *first_len)
{
    const uint8_t *table = q->desc;
    uint32_t limit = q->size, i = head, seen = 0, want = writable ? DESC_F_WRITE : 0;
    uint32_t perm = writable ? 2 : 1;
    int nested = 0;
    uint64_t total = 0;
    struct desc d;
    *first_len = 0;
    for (;;) {
        memcpy(&d, table + 16 * (size_t)i, 16);   /* each descriptor is read once */
        if (d.flags & DESC_F_INDIRECT) {
            const struct range *s;
            if (!q->indirect)
                return fault(q, F_INDIRECT_OFF, head, 0, 0);
            if (nested)
                return fault(q, F_INDIRECT_NESTED, head, 0, 0);
            if (d.flags & DESC_F_NEXT)
                return fault(q, F_INDIRECT_NEXT, head, 0, 0);
            if (d.len == 0 || d.len % 16 || d.len / 16 > MAX_QUEUE_SIZE)
                return fault(q, F_INDIRECT_LEN, head, d.len, 0);
            if (d.addr + d.len < d.addr && d.addr + d.len != 0)
                return VHOSTD_SLOW;                /* past 2**64: the reference words it */
            s = tc_find(c, d.addr, 1);
            if (!s)
                return need(q, d.addr, 1);
            if (!tc_covers(s, d.addr, d.len))
                return VHOSTD_SLOW;                /* one view or not: the reference decides */
            table = (const uint8_t *)(uintptr_t)(s->host + (d.addr - s->start));
            limit = d.len / 16;
            i = seen = 0;
            nested = 1;
            continue;
        }
        if (++seen > limit)
            return fault(q, F_LOOP, head, 0, limit);
        if ((d.flags & DESC_F_WRITE) != want)
            return fault(q, F_DIRECTION, head, writable, 0);
        if (d.len) {
            uint64_t a = d.addr, rem = d.len;
            total += d.len;
            if (total > q->max_chain_bytes)
                return fault(q, F_TOO_LONG, head, total, 0);
            if (a + rem < a && a + rem != 0)
                return VHOSTD_SLOW;                /* past 2**64 */
            if (*first_len == 0)
                *first_len = d.len;
            while (rem) {
                uint64_t room1, n;
                const struct range *s = tc_find(c, a, perm);
                if (!s)
                    return need(q, a, perm);
                if (*np >= q->max_pieces)
                    return VHOSTD_SLOW;
                room1 = s->last - a;               /* bytes left in the range, minus one */
                n = rem - 1 <= room1 ? rem : room1 + 1;
                q->pieces[*np].ptr = (uint8_t *)(uintptr_t)(s->host + (a - s->start));
                q->pieces[*np].len = (uint32_t)n;
                (*np)++;
                a += n;
                rem -= n;
            }
        }
        if (!(d.flags & DESC_F_NEXT)) {
            *total_out = total;
            return VHOSTD_DONE;
        }
        if (d.next >= limit)
            return fault(q, F_NEXT_RANGE, head, d.next, limit);
        i = d.next;
    }
}

/* TxQueue.burst: take up to limit chains; collect frames or only count them. */
static int vhostd_tx_burst(struct vhostd_vq *q, struct vhostd_tcache *c, uint32_t limit,
                           uint32_t hdr_len, uint32_t max_frame, int collect,
                           struct vhostd_frame *frames, uint32_t *nframes, uint32_t *done_out)
{
    uint32_t n, done = 0, nf = 0;
    uint64_t scratch_used = 0;
    int rc = avail_count(q, &n);
    if (rc)
        goto out;
    if (n > limit)
        n = limit;
    while (done < n) {
        uint32_t head, np = 0, first_len;
        uint64_t total;
        int64_t size;
        if ((rc = head_at(q, 0, &head)))
            break;
        if ((rc = walk(q, c, head, 0, &np, &total, &first_len)))
            break;
        size = (int64_t)total - (int64_t)hdr_len;
        if (size < MIN_FRAME || size > (int64_t)max_frame) {
            q->dropped++;
        } else {
            const struct vhostd_piece *p = q->pieces;
            int ok = 1;
            if (p[0].len >= 2)
                ok = !(p[0].ptr[0] & 1) && p[0].ptr[1] == 0;
            else if (first_len >= 2) {
                rc = VHOSTD_SLOW;                 /* the reference's first view may be longer */
                break;
            }
            if (!ok) {
                q->bad_header++;
                q->dropped++;
            } else {
                if (collect) {
                    uint32_t k = 0, off = hdr_len;
                    while (k < np && off >= p[k].len) {
                        off -= p[k].len;
                        k++;
                    }
                    if (p[k].len - off >= (uint64_t)size) {
                        frames[nf].ptr = p[k].ptr + off;    /* contiguous: no copy */
                    } else {
                        uint8_t *dst;
                        uint64_t left = (uint64_t)size;
                        if ((uint64_t)size > q->scratch_len - scratch_used) {
                            rc = VHOSTD_FULL;
                            break;
                        }
                        dst = q->scratch + scratch_used;
                        frames[nf].ptr = dst;
                        for (; left; k++, off = 0) {
                            uint64_t m = p[k].len - off;
                            if (m > left)
                                m = left;
                            memcpy(dst, p[k].ptr + off, m);
                            dst += m;
                            left -= m;
                        }
                        scratch_used += (uint64_t)size;
                    }
                    frames[nf].len = (uint32_t)size;
                    nf++;
                }
                q->packets++;
                q->bytes += (uint64_t)size;
            }
        }
        put(q, head, 0);
        done++;
    }
out:
    *done_out = done;
    *nframes = nf;
    return rc;
}

/* Copy data into pieces starting offset bytes into them (RxQueue's _scatter). */
static void scatter(const struct vhostd_piece *p, uint32_t np, uint64_t offset,
                    const uint8_t *data, uint64_t len)
{
    uint32_t k;
    for (k = 0; k < np && len; k++) {
        uint64_t m;
        if (offset >= p[k].len) {
            offset -= p[k].len;
            continue;
        }
        m = p[k].len - offset;
        if (m > len)
            m = len;
        memcpy(p[k].ptr + offset, data, m);
        data += m;
        len -= m;
        offset = 0;
    }
}

/* RxQueue.deliver for one frame. */
static int vhostd_rx_deliver(struct vhostd_vq *q, struct vhostd_tcache *c,
                             const uint8_t *frame, uint32_t flen, int mergeable,
                             uint32_t hdr_len, const uint8_t *hdr)
{
    uint64_t need_bytes = (uint64_t)hdr_len + flen, room = 0, total;
    uint32_t avail, head, np = 0, first_len, nheads = 0, k;
    int rc = avail_count(q, &avail);
    if (rc)
        return rc;
    if (!mergeable) {
        if (avail == 0)
            return VHOSTD_NOBUF;
        if ((rc = head_at(q, 0, &head)))
            return rc;
        if ((rc = walk(q, c, head, 1, &np, &total, &first_len)))
            return rc;
        if (total < need_bytes)
            return VHOSTD_DROPPED;
        scatter(q->pieces, np, 0, hdr, hdr_len);
        scatter(q->pieces, np, hdr_len, frame, flen);
        put(q, head, (uint32_t)need_bytes);
        return VHOSTD_DONE;
    }
    while (room < need_bytes) {
        if (nheads == avail)
            return VHOSTD_NOBUF;
        if (nheads >= q->max_heads)
            return VHOSTD_SLOW;
        if ((rc = head_at(q, nheads, &head)))
            return rc;
        if ((rc = walk(q, c, head, 1, &np, &total, &first_len)))
            return rc;
        q->heads[nheads].id = head;
        q->heads[nheads].got = (uint32_t)total;  /* <= 4 GiB: max_chain_bytes bounds it */
        nheads++;
        room += total;
    }
    {
        uint8_t h[64];
        uint64_t left = need_bytes;
        memcpy(h, hdr, hdr_len);
        if (hdr_len >= 12) {
            h[10] = (uint8_t)nheads;
            h[11] = (uint8_t)(nheads >> 8);
        }
        scatter(q->pieces, np, 0, h, hdr_len);
        scatter(q->pieces, np, hdr_len, frame, flen);
        for (k = 0; k < nheads; k++) {
            uint64_t used = q->heads[k].got < left ? q->heads[k].got : left;
            put(q, q->heads[k].id, (uint32_t)used);
            left -= used;
        }
    }
    return VHOSTD_DONE;
}

/* RxQueue.deliver for each of n frames in order, stopping before the first one
   that is neither delivered nor dropped (its rc is returned, *done frames were
   handled and counted in packets/bytes/dropped). With nsel > 1 RX queues, it
   also stops before a frame that Session.send would hash to another queue than
   want. Each frame is first copied to
   q->scratch, MACs swapped if asked (what Port._reflect's bytearray does): the
   source may be guest memory that this very delivery overwrites. */
static int vhostd_rx_deliver_batch(struct vhostd_vq *q, struct vhostd_tcache *c,
                                   const struct vhostd_frame *frames, uint32_t n, int mergeable,
                                   uint32_t hdr_len, const uint8_t *hdr, int swap,
                                   uint32_t nsel, uint32_t want, uint32_t *done)
{
    uint32_t k;
    int rc = VHOSTD_DONE;
    for (k = 0; k < n; k++) {
        const uint8_t *f = frames[k].ptr;
        uint32_t flen = frames[k].len;
        if (flen > q->scratch_len || (flen < 12 && (swap || nsel > 1))) {
            rc = VHOSTD_SLOW;
            break;
        }
        if (nsel > 1 && (uint32_t)(f[5] ^ f[11]) % nsel != want) {
            rc = VHOSTD_OTHER;
            break;
        }
        if (swap) {
            memcpy(q->scratch, f + 6, 6);
            memcpy(q->scratch + 6, f, 6);
            memcpy(q->scratch + 12, f + 12, flen - 12);
        } else {
            memcpy(q->scratch, f, flen);
        }
        rc = vhostd_rx_deliver(q, c, q->scratch, flen, mergeable, hdr_len, hdr);
        if (rc == VHOSTD_DONE) {
            q->packets++;
            q->bytes += flen;
        } else if (rc == VHOSTD_DROPPED) {
            q->dropped++;
            rc = VHOSTD_DONE;
        } else {
            break;
        }
    }
    *done = k;
    return rc;
}

/* Where the run of frames with the same 12 MAC bytes as frames[start] ends
   (frames[start, result) share them; at least start + 1). The switch decides
   once per run: learning the same source twice in a burst changes nothing. */
static uint32_t vhostd_mac_run(const struct vhostd_frame *frames, uint32_t start, uint32_t n)
{
    const uint8_t *m = frames[start].ptr;
    uint32_t k = start + 1;
    if (frames[start].len < 12)
        return k;
    while (k < n && frames[k].len >= 12 && memcmp(frames[k].ptr, m, 12) == 0)
        k++;
    return k;
}
"""

ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "vhostd._native", SOURCE.replace("/* SHARED */", SHARED), extra_compile_args=["-O2"]
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=False)
