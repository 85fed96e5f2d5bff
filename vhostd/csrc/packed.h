/* The packed ring walk (packed.py's PackedQueue, check for check).
 *
 * Positions are vhost-user's encoding: bits 0-14 the index, bit 15 the wrap
 * counter. A head is the position of a chain's first descriptor; walking it
 * records the chain's buffer id (from its last descriptor) and ring
 * descriptor count in q->p_ids/q->p_counts, which put and head_at use.
 * Included by ring.h after the fault helpers; called through its primitives.
 * head_at and put are inline here: net.c calls them once per frame.
 */
#ifndef VHOSTD_PACKED_H
#define VHOSTD_PACKED_H

#include <stdint.h>
#include <string.h>

#include "log.h"
#include "tcache.h"
#include "vhostd.h"

/* cffi:begin */
/* (nothing: Python reaches the packed walk through vhostd.h's entry points) */
/* cffi:end */

#define PACKED_F_AVAIL (1u << 7)
#define PACKED_F_USED (1u << 15)
#define PACKED_WRAP 0x8000u
#define PACKED_FLAGS_AT 14
#define PACKED_F_WRITE 2u   /* DESC_F_WRITE: the put's flags say the device wrote */

/* The position n (<= size) descriptors after pos. */
static inline uint32_t vhostd_packed_advance(uint32_t pos, uint32_t n, uint32_t size)
{
    uint32_t idx = (pos & 0x7fff) + n, wrap = pos & PACKED_WRAP;
    if (idx >= size) {
        idx -= size;
        wrap ^= PACKED_WRAP;
    }
    return idx | wrap;
}

/* Whether a descriptor at pos with these flags is available to the device. */
static inline int vhostd_packed_avail(uint32_t flags, uint32_t pos)
{
    int wrap = (pos & PACKED_WRAP) != 0;
    return ((flags & PACKED_F_AVAIL) != 0) == wrap && ((flags & PACKED_F_USED) != 0) != wrap;
}

/* i % size for an index that is below size whenever the ring is sane: no
   division on the hot path, the same slot for one that is not. */
static inline uint32_t vhostd_packed_slot(uint32_t i, uint32_t size)
{
    return i < size ? i : i % size;
}

int vhostd_packed_walk(struct vhostd_vq *q, struct vhostd_tcache *c, uint32_t head, int writable,
                       uint32_t *np, uint64_t *total_out, uint32_t *first_len);

/* A batch of puts (vhostd_tx_complete returning a whole burst) makes the
   first used descriptor visible last: the driver, polling that one, sees the
   whole batch at once instead of taking the ring's cache lines back after
   every descriptor. Only the timing within the call changes, never what the
   ring holds when the call returns. Only for a loop of nothing but puts: one
   that also reads or writes guest memory (RX delivery: the frame, the walk,
   the scatter) could meet the held descriptor, e.g. a hostile buffer laid
   over the ring, and see or overwrite what the reference would not. */
static inline void vhostd_packed_hold(struct vhostd_vq *q)
{
    q->p_hold = q->packed ? 1 : 0;
}

/* Store the held flags (release: after every used descriptor before them). */
static inline void vhostd_packed_release(struct vhostd_vq *q)
{
    if (q->p_hold == 2)
        __atomic_store_n((uint16_t *)(void *)(q->desc + 16 * (size_t)q->p_held_at + PACKED_FLAGS_AT),
                         q->p_held_flags, __ATOMIC_RELEASE);
    q->p_hold = 0;
}

/* A descriptor's flags, read before the rest of it (acquire). */
static inline uint16_t vhostd_packed_flags(const uint8_t *d)
{
    return __atomic_load_n((const uint16_t *)(const void *)(d + PACKED_FLAGS_AT), __ATOMIC_ACQUIRE);
}

/* The nth not-yet-taken chain starts after the n chains before it, whose
   descriptor counts their walks recorded: hop over them from the cursor. */
static inline int vhostd_packed_head_at(struct vhostd_vq *q, uint32_t nth, uint32_t *head)
{
    uint32_t size = q->size, pos, k;
    if (q->p_cur_base != q->last_avail || q->p_cur_nth > nth) {
        q->p_cur_base = q->last_avail;
        q->p_cur_nth = 0;
        q->p_cur_pos = q->last_avail;
    }
    pos = q->p_cur_pos;
    for (k = q->p_cur_nth; k < nth; k++) {
        uint32_t n = q->p_counts[pos & 0x7fff];
        pos = vhostd_packed_advance(pos, n <= size ? n : n % (size + 1), size);
    }
    q->p_cur_nth = nth;
    q->p_cur_pos = (uint16_t)pos;
    if ((pos & 0x7fff) >= size)
        return VHOSTD_NOBUF;
    if (!vhostd_packed_avail(vhostd_packed_flags(q->desc + 16 * (size_t)(pos & 0x7fff)), pos))
        return VHOSTD_NOBUF;
    *head = pos;
    return VHOSTD_DONE;
}

/* Write the used descriptor for the chain at head where the used position
   is (id and len, then its flags with release order, or held: see
   vhostd_packed_hold) and move both positions past the chain's descriptors. */
static inline void vhostd_packed_put(struct vhostd_vq *q, uint32_t head, uint32_t written)
{
    uint32_t size = q->size, slot = vhostd_packed_slot(head & 0x7fff, size);
    uint32_t at = vhostd_packed_slot(q->last_used & 0x7fff, size);
    uint32_t count = q->p_counts[slot];
    uint16_t id = q->p_ids[slot];
    uint16_t flags = (q->last_used & PACKED_WRAP) ? (uint16_t)(PACKED_F_AVAIL | PACKED_F_USED) : 0;
    uint8_t *d = q->desc + 16 * (size_t)at;
    if (count > size)
        count %= size + 1;
    if (written)
        flags |= PACKED_F_WRITE;
    if (q->p_hold == 2 && q->p_held_at == at)
        vhostd_packed_release(q);             /* round the whole ring: never write over it */
    memcpy(d + 8, &written, 4);
    memcpy(d + 12, &id, 2);
    if (q->p_hold == 1) {
        q->p_held_at = at;
        q->p_held_flags = flags;
        q->p_hold = 2;
    } else {
        __atomic_store_n((uint16_t *)(void *)(d + PACKED_FLAGS_AT), flags, __ATOMIC_RELEASE);
    }
    vhostd_log_write(q->log, q->log_used + 16 * (uint64_t)at + 8, 8);
    if (!count)
        count = 1;
    q->last_used = (uint16_t)vhostd_packed_advance(q->last_used, count, size);
    q->last_avail = (uint16_t)vhostd_packed_advance(q->last_avail, count, size);
}

#endif
