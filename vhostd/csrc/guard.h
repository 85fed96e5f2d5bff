/* The SIGBUS guard: guest memory that vanishes under a mapping costs one
 * connection, not the daemon.
 *
 * A front-end shares guest RAM as a file (memfd, hugetlbfs, /dev/shm) and
 * vhostd maps it MAP_SHARED. If the front-end then shrinks that file, every
 * access to a page past the new end raises SIGBUS, whose default action
 * kills vhostd and the network of every guest on the host. Files sealed
 * with F_SEAL_SHRINK (QEMU's memfds) cannot shrink; memory.py registers here
 * every mapping whose file can.
 *
 * On a SIGBUS whose address lies inside a registered range, the handler maps
 * private zero pages over the whole range (so the faulting access and every
 * later one complete harmlessly: reads see zeros, writes go nowhere), marks
 * the range lost and writes its eventfd; the session waiting on that eventfd
 * closes the connection. A SIGBUS anywhere else, or one sent with kill(),
 * goes to the handler that was there before ours, as if we had never been
 * installed (default: the process dies; under pytest, faulthandler dumps).
 *
 * Why a fixed global table: a signal handler receives only the signal and
 * its siginfo, so everything it consults must be reachable from a global,
 * and it must not allocate. VHOSTD_GUARD_SLOTS bounds the mappings guarded
 * at once across all connections (memory.py refuses a region it cannot
 * guard).
 *
 * Async-signal safety: the handler reads the table with atomic loads, calls
 * only mmap (as a raw system call, so no libc or sanitizer wrapper runs),
 * write, sigaction and raise, keeps errno, and takes no lock. Registration
 * publishes a slot with a release store after filling it, and retires it
 * with a store, so a handler never sees a half-written slot. Register and
 * unregister are called from Python only, one caller at a time (the
 * daemon's single thread; the GIL).
 */
#ifndef VHOSTD_GUARD_H
#define VHOSTD_GUARD_H

#include <stdint.h>

/* cffi:begin */

enum { VHOSTD_GUARD_SLOTS = 4096 };

/* Guard [start, start+length): returns the slot, or -1 when every slot is
   taken, or -2 when the SIGBUS handler could not be installed (errno set).
   notify_fd (an eventfd, or -1) gets an 8-byte write when the range is lost.
   Installs the handler on first use, and again if someone replaced it. */
int vhostd_guard_register(uint8_t *start, uint64_t length, int notify_fd);
/* Stop guarding a slot; call before the range is unmapped or remapped. */
void vhostd_guard_unregister(int slot);
/* 1 once a SIGBUS hit the slot's range (the range now holds zero pages). */
int vhostd_guard_lost(int slot);
/* SIGBUS faults the guard absorbed since the process started. */
uint64_t vhostd_guard_faults(void);

/* cffi:end */

#endif
