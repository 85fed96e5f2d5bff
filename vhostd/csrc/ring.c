/* The split ring walk: one chain at a time, every descriptor read once. */
#include "ring.h"

/* A full barrier: orders the used-index store before the event-index load. */
void vhostd_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

int vhostd_split_walk(struct vhostd_vq *q, struct vhostd_tcache *c, uint32_t head, int writable,
                      uint32_t *np, uint64_t *total_out, uint32_t *first_len)
{
    const uint8_t *table = q->desc;
    uint32_t limit = q->size, i = head, seen = 0, want = writable ? DESC_F_WRITE : 0;
    uint32_t perm = writable ? 2 : 1;
    int nested = 0, rc;
    uint64_t total = 0;
    struct vhostd_desc d;
    *first_len = 0;
    for (;;) {
        memcpy(&d, table + 16 * (size_t)i, 16);
        if (d.flags & DESC_F_INDIRECT) {
            const struct vhostd_range *s;
            if (!q->indirect)
                return vhostd_fault(q, F_INDIRECT_OFF, head, 0, 0);
            if (nested)
                return vhostd_fault(q, F_INDIRECT_NESTED, head, 0, 0);
            if (d.flags & DESC_F_NEXT)
                return vhostd_fault(q, F_INDIRECT_NEXT, head, 0, 0);
            if (d.len == 0 || d.len % 16 || d.len / 16 > MAX_QUEUE_SIZE)
                return vhostd_fault(q, F_INDIRECT_LEN, head, d.len, 0);
            if (d.addr + d.len < d.addr && d.addr + d.len != 0)
                return VHOSTD_SLOW;                /* past 2**64: the reference words it */
            s = vhostd_tc_find(c, d.addr, 1);
            if (!s)
                return vhostd_need(q, d.addr, 1);
            if (!vhostd_tc_covers(s, d.addr, d.len))
                return VHOSTD_SLOW;                /* one view or not: the reference decides */
            table = vhostd_tc_host(s, d.addr);
            limit = d.len / 16;
            i = seen = 0;
            nested = 1;
            continue;
        }
        if (++seen > limit)
            return vhostd_fault(q, F_LOOP, head, 0, limit);
        if ((d.flags & DESC_F_WRITE) != want)
            return vhostd_fault(q, F_DIRECTION, head, (uint64_t)writable, 0);
        if ((rc = vhostd_add_desc(q, c, head, d.addr, d.len, perm, np, &total, first_len)))
            return rc;
        if (!(d.flags & DESC_F_NEXT)) {
            *total_out = total;
            return VHOSTD_DONE;
        }
        if (d.next >= limit)
            return vhostd_fault(q, F_NEXT_RANGE, head, d.next, limit);
        i = d.next;
    }
}
