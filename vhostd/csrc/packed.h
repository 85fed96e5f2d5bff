/* The packed ring walk (packed.py's PackedQueue, check for check).
 *
 * Positions are vhost-user's encoding: bits 0-14 the index, bit 15 the wrap
 * counter. A head is the position of a chain's first descriptor; walking it
 * records the chain's buffer id (from its last descriptor) and ring
 * descriptor count in q->p_ids/q->p_counts, which put and head_at use.
 * Included by ring.h after the fault helpers; called through its primitives.
 */
#ifndef VHOSTD_PACKED_H
#define VHOSTD_PACKED_H

#include <stdint.h>

#include "tcache.h"
#include "vhostd.h"

/* cffi:begin */
/* (nothing: Python reaches the packed walk through vhostd.h's entry points) */
/* cffi:end */

#define PACKED_F_AVAIL (1u << 7)
#define PACKED_F_USED (1u << 15)
#define PACKED_WRAP 0x8000u

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

int vhostd_packed_head_at(struct vhostd_vq *q, uint32_t nth, uint32_t *head);
int vhostd_packed_walk(struct vhostd_vq *q, struct vhostd_tcache *c, uint32_t head, int writable,
                       uint32_t *np, uint64_t *total_out, uint32_t *first_len);
void vhostd_packed_put(struct vhostd_vq *q, uint32_t head, uint32_t written);

/* A batch of puts (one C call returning many chains) makes the first used
   descriptor visible last: the driver, polling that one, sees the whole
   batch at once instead of taking the ring's cache lines back after every
   descriptor. Only the timing within the call changes, never what the ring
   holds when the call returns: every entry point that holds releases. */
static inline void vhostd_packed_hold(struct vhostd_vq *q)
{
    q->p_hold = q->packed ? 1 : 0;
}

/* Store the held flags (release: after every used descriptor before them). */
static inline void vhostd_packed_release(struct vhostd_vq *q)
{
    if (q->p_hold == 2)
        __atomic_store_n((uint16_t *)(void *)(q->desc + 16 * (size_t)q->p_held_at + 14),
                         q->p_held_flags, __ATOMIC_RELEASE);
    q->p_hold = 0;
}

#endif
