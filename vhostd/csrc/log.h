/* The dirty log of live migration: one bit per 4 KiB guest-physical page.
 *
 * While the front-end migrates the guest it shares a bitmap (SET_LOG_BASE)
 * and reads and clears it between copy rounds; every page the back-end
 * writes must have its bit set before the write is published to the driver
 * (the used index store is a release, which orders these before it). A bit
 * already set is left alone, so a page written over and over costs a load,
 * not a locked operation. Pages past the end of the bitmap are never
 * written: they are counted in overflow (SET_LOG_BASE refuses a log too
 * small for the memory table, so that means a hostile driver).
 */
#ifndef VHOSTD_LOG_H
#define VHOSTD_LOG_H

#include "vhostd.h"

#define VHOSTD_LOG_PAGE_SHIFT 12

static inline void vhostd_log_write(struct vhostd_log *l, uint64_t gpa, uint64_t len)
{
    uint64_t p, last;
    if (!l || !len)
        return;
    p = gpa >> VHOSTD_LOG_PAGE_SHIFT;
    last = (gpa + (len - 1)) >> VHOSTD_LOG_PAGE_SHIFT;
    if (gpa + (len - 1) < gpa)          /* runs past 2**64: no page up there is RAM */
        last = UINT64_MAX >> VHOSTD_LOG_PAGE_SHIFT;
    for (;; p++) {
        uint8_t *byte, bit;
        if (p >= l->pages) {
            l->overflow++;
            return;
        }
        byte = l->bits + (p >> 3);
        bit = (uint8_t)(1u << (p & 7));
        if (!(__atomic_load_n(byte, __ATOMIC_RELAXED) & bit)) {
            __atomic_fetch_or(byte, bit, __ATOMIC_RELAXED);
            l->logged++;
        }
        if (p == last)
            return;
    }
}

#endif
