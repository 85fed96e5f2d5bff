/* The translation cache's mutations (lookups are inline in tcache.h). */
#include <string.h>

#include "tcache.h"

void vhostd_tc_clear(struct vhostd_tcache *c)
{
    c->n = c->next = c->hit = 0;
    if (++c->epoch == 0) {       /* wrapped: forget every page slot for real */
        memset(c->page, 0, sizeof c->page);
        c->epoch = 1;
    }
}

void vhostd_tc_insert(struct vhostd_tcache *c, uint64_t addr, uint64_t start,
                      uint64_t last, uint64_t host, uint32_t perm, uint64_t gpa)
{
    struct vhostd_range *r;
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
    r->gpa = gpa;
    r->perm = perm;
    r->epoch = c->epoch;
}
