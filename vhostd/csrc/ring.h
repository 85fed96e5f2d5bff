/* The split ring walk (virtqueue.py's SplitQueue, check for check), and the
 * ring primitives net.c uses: avail_count, head_at, walk and put hand a
 * packed ring (q->packed) to packed.h's walker, so net.c has one loop.
 *
 * Every guest access of a walk goes through the translation cache; ring
 * pointers are local addresses Python took from GuestMemory.ring.
 */
#ifndef VHOSTD_RING_H
#define VHOSTD_RING_H

#include <string.h>

#include "log.h"
#include "tcache.h"

/* Fault codes, in QueueFault order (fastpath._FAULTS). */
enum { F_HEAD_RANGE = 1, F_NEXT_RANGE, F_LOOP, F_AVAIL_JUMP, F_INDIRECT_LEN,
       F_INDIRECT_NESTED, F_INDIRECT_NEXT, F_INDIRECT_OFF, F_DIRECTION, F_TOO_LONG,
       F_RX_SMALL, F_WRAP, F_ID_RANGE };

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define DESC_F_INDIRECT 4
#define MAX_QUEUE_SIZE 32768

struct vhostd_desc { uint64_t addr; uint32_t len; uint16_t flags; uint16_t next; };

static inline int vhostd_fault(struct vhostd_vq *q, uint32_t kind, uint64_t head,
                               uint64_t value, uint64_t limit)
{
    q->fault = kind;
    q->f_head = head;
    q->f_value = value;
    q->f_limit = limit;
    return VHOSTD_FAULT;
}

static inline int vhostd_need(struct vhostd_vq *q, uint64_t addr, uint32_t perm)
{
    q->need_addr = addr;
    q->need_perm = perm;
    return VHOSTD_NEED;
}

/* Append the pieces of one descriptor's buffer [addr, addr + len) to
   q->pieces from *np on, adding len to *total (bounded by max_chain_bytes). */
static inline __attribute__((always_inline)) int vhostd_add_desc(struct vhostd_vq *q, struct vhostd_tcache *c, uint64_t head,
                                  uint64_t addr, uint32_t len, uint32_t perm, uint32_t *np,
                                  uint64_t *total, uint32_t *first_len)
{
    uint64_t a = addr, rem = len;
    if (!len)
        return VHOSTD_DONE;
    *total += len;
    if (*total > q->max_chain_bytes)
        return vhostd_fault(q, F_TOO_LONG, head, *total, 0);
    if (a + rem < a && a + rem != 0)
        return VHOSTD_SLOW;                        /* past 2**64: the reference words it */
    if (*first_len == 0)
        *first_len = len;
    while (rem) {
        uint64_t room1, n;
        const struct vhostd_range *s = vhostd_tc_find(c, a, perm);
        if (!s)
            return vhostd_need(q, a, perm);
        if (*np >= q->max_pieces)
            return VHOSTD_SLOW;
        room1 = s->last - a;                       /* bytes left in the range, minus one */
        n = rem - 1 <= room1 ? rem : room1 + 1;
        q->pieces[*np].ptr = vhostd_tc_host(s, a);
        q->pieces[*np].len = (uint32_t)n;
        q->pieces[*np].gpa = s->gpa + (a - s->start);
        (*np)++;
        a += n;
        rem -= n;
    }
    return VHOSTD_DONE;
}

#include "packed.h"

/* How many chains the driver made available that we have not taken (packed:
   at most the ring; vhostd_head_at tells where they end). */
static inline int vhostd_avail_count(struct vhostd_vq *q, uint32_t *n)
{
    uint16_t idx;
    uint32_t k;
    if (q->packed) {
        *n = q->size;
        return VHOSTD_DONE;
    }
    idx = __atomic_load_n((uint16_t *)(void *)(q->avail + 2), __ATOMIC_ACQUIRE);
    k = (uint16_t)(idx - q->last_avail);
    if (k > q->size)
        return vhostd_fault(q, F_AVAIL_JUMP, q->last_avail, k, q->size);
    *n = k;
    return VHOSTD_DONE;
}

/* The head descriptor of the nth not-yet-taken available chain (packed: its
   position, or VHOSTD_NOBUF when none is there). */
static inline int vhostd_head_at(struct vhostd_vq *q, uint32_t nth, uint32_t *head)
{
    uint16_t h;
    uint32_t slot;
    if (q->packed)
        return vhostd_packed_head_at(q, nth, head);
    slot = (uint32_t)(uint16_t)(q->last_avail + nth) % q->size;
    memcpy(&h, q->avail + 4 + 2 * (size_t)slot, 2);
    if (h >= q->size)
        return vhostd_fault(q, F_HEAD_RANGE, h, h, q->size);
    *head = h;
    return VHOSTD_DONE;
}

/* Return a chain as used, without publishing the index. */
static inline void vhostd_put(struct vhostd_vq *q, uint32_t head, uint32_t written)
{
    uint32_t elem[2] = {head, written};
    size_t at;
    if (q->packed) {
        vhostd_packed_put(q, head, written);
        return;
    }
    at = 4 + 8 * (size_t)(q->last_used % q->size);
    memcpy(q->used + at, elem, 8);
    vhostd_log_write(q->log, q->log_used + at, 8);
    q->last_used++;
    q->last_avail++;
}

int vhostd_split_walk(struct vhostd_vq *q, struct vhostd_tcache *c, uint32_t head, int writable,
                      uint32_t *np, uint64_t *total_out, uint32_t *first_len);

/* Append the pieces of the chain at head to q->pieces from *np on (packed too). */
static inline int vhostd_walk(struct vhostd_vq *q, struct vhostd_tcache *c, uint32_t head,
                              int writable, uint32_t *np, uint64_t *total_out, uint32_t *first_len)
{
    if (q->packed)
        return vhostd_packed_walk(q, c, head, writable, np, total_out, first_len);
    return vhostd_split_walk(q, c, head, writable, np, total_out, first_len);
}

#endif
