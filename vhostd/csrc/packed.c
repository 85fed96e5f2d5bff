/* The packed ring walk: one chain at a time, every descriptor read once, its
   flags first (acquire) and the rest after. */
#include "ring.h"

/* An indirect table: len/16 descriptors in order, NEXT ignored inside. */
static int walk_indirect(struct vhostd_vq *q, struct vhostd_tcache *c, uint32_t head,
                         uint64_t addr, uint32_t len, uint32_t flags, uint32_t want,
                         uint32_t perm, uint32_t *np, uint64_t *total, uint32_t *first_len)
{
    const struct vhostd_range *s;
    const uint8_t *table;
    uint32_t i;
    int rc;
    if (!q->indirect)
        return vhostd_fault(q, F_INDIRECT_OFF, head, 0, 0);
    if (flags & DESC_F_NEXT)
        return vhostd_fault(q, F_INDIRECT_NEXT, head, 0, 0);
    if (len == 0 || len % 16 || len / 16 > MAX_QUEUE_SIZE)
        return vhostd_fault(q, F_INDIRECT_LEN, head, len, 0);
    if (addr + len < addr && addr + len != 0)
        return VHOSTD_SLOW;
    s = vhostd_tc_find(c, addr, 1);
    if (!s)
        return vhostd_need(q, addr, 1);
    if (!vhostd_tc_covers(s, addr, len))
        return VHOSTD_SLOW;                    /* one view or not: the reference decides */
    table = vhostd_tc_host(s, addr);
    for (i = 0; i < len / 16; i++) {
        uint64_t a;
        uint32_t n;
        uint16_t f;
        memcpy(&a, table + 16 * (size_t)i, 8);
        memcpy(&n, table + 16 * (size_t)i + 8, 4);
        memcpy(&f, table + 16 * (size_t)i + PACKED_FLAGS_AT, 2);
        if (f & DESC_F_INDIRECT)
            return vhostd_fault(q, F_INDIRECT_NESTED, head, 0, 0);
        if ((f & DESC_F_WRITE) != want)
            return vhostd_fault(q, F_DIRECTION, head, want ? 1 : 0, 0);
        if ((rc = vhostd_add_desc(q, c, head, a, n, perm, np, total, first_len)))
            return rc;
    }
    return VHOSTD_DONE;
}

int vhostd_packed_walk(struct vhostd_vq *q, struct vhostd_tcache *c, uint32_t head, int writable,
                       uint32_t *np, uint64_t *total_out, uint32_t *first_len)
{
    uint32_t size = q->size, pos = head, ndesc = 0, want = writable ? DESC_F_WRITE : 0;
    uint32_t perm = writable ? 2 : 1, slot = vhostd_packed_slot(head & 0x7fff, size);
    uint64_t total = 0;
    uint16_t id = 0;
    int rc;
    *first_len = 0;
    for (;;) {
        const uint8_t *d;
        uint64_t addr;
        uint32_t len, flags;
        if (ndesc >= size)
            return vhostd_fault(q, F_LOOP, head, 0, size);
        d = q->desc + 16 * (size_t)(pos & 0x7fff);
        flags = vhostd_packed_flags(d);
        if (!vhostd_packed_avail(flags, pos))
            return vhostd_fault(q, F_WRAP, head, pos, flags);
        memcpy(&addr, d, 8);
        memcpy(&len, d + 8, 4);
        memcpy(&id, d + 12, 2);
        ndesc++;
        if (flags & DESC_F_INDIRECT) {
            rc = walk_indirect(q, c, head, addr, len, flags, want, perm, np, &total, first_len);
            if (rc)
                return rc;
            break;
        }
        if ((flags & DESC_F_WRITE) != want)
            return vhostd_fault(q, F_DIRECTION, head, (uint64_t)writable, 0);
        if ((rc = vhostd_add_desc(q, c, head, addr, len, perm, np, &total, first_len)))
            return rc;
        if (!(flags & DESC_F_NEXT))
            break;
        pos = vhostd_packed_advance(pos, 1, size);
    }
    if (id >= size)
        return vhostd_fault(q, F_ID_RANGE, head, id, size);
    q->p_ids[slot] = id;
    q->p_counts[slot] = (uint16_t)ndesc;
    *total_out = total;
    return VHOSTD_DONE;
}
