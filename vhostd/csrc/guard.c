/* The SIGBUS guard (guard.h): a fault in a registered range costs that range, not the process. */
#define _GNU_SOURCE
#include "guard.h"

#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

enum { SLOT_FREE = 0, SLOT_LIVE = 1 };

struct guard_slot {
    uintptr_t start;
    uintptr_t length;
    int fd;
    int lost;     /* atomic */
    int state;    /* atomic: SLOT_LIVE once start/length/fd are written */
};

static struct guard_slot slots[VHOSTD_GUARD_SLOTS];
static struct sigaction previous;  /* the SIGBUS action before ours */
static uintptr_t page_size = 4096;
static uint64_t faults;            /* atomic */
static int passed_on;              /* a SIGBUS was handed to `previous` */

/* Private zero pages over [start, start+length); 1 on success. A raw system
   call: nothing but the kernel runs inside the signal handler. */
static int zero_fill(uintptr_t start, uintptr_t length)
{
    long got = syscall(SYS_mmap, start, length, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
    return got != -1 && (uintptr_t)got == start;
}

/* Give the signal to the action that was there before ours. A fault repeats
   when the handler returns and then reaches that action; a sent signal is
   raised again (blocked until we return). If we are entered again after that
   (the previous handler chained back to us), fall back to the default. */
static void pass_on(int sig, int fault)
{
    if (passed_on) {
        struct sigaction dfl;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        sigemptyset(&dfl.sa_mask);
        sigaction(sig, &dfl, NULL);
    } else {
        passed_on = 1;
        sigaction(sig, &previous, NULL);
    }
    if (!fault)
        raise(sig);
}

static void on_sigbus(int sig, siginfo_t *info, void *uctx)
{
    int saved_errno = errno;
    int fault = info->si_code > 0;  /* a memory fault, not kill()/sigqueue()/tgkill() */
    (void)uctx;
    if (fault) {
        uintptr_t addr = (uintptr_t)info->si_addr;
        for (int i = 0; i < VHOSTD_GUARD_SLOTS; i++) {
            struct guard_slot *s = &slots[i];
            if (__atomic_load_n(&s->state, __ATOMIC_ACQUIRE) != SLOT_LIVE)
                continue;
            if (addr - s->start >= s->length)
                continue;
            /* The whole range at once (the file is gone for all of it, and
               the connection is about to close); else at least the page. */
            if (!zero_fill(s->start, s->length) && !zero_fill(addr & ~(page_size - 1), page_size))
                break;  /* cannot repair it: behave as if unguarded */
            __atomic_store_n(&s->lost, 1, __ATOMIC_RELEASE);
            __atomic_add_fetch(&faults, 1, __ATOMIC_RELAXED);
            if (s->fd >= 0) {
                uint64_t one = 1;
                ssize_t n = write(s->fd, &one, sizeof one);
                (void)n;  /* a full eventfd is already readable */
            }
            errno = saved_errno;
            return;
        }
    }
    pass_on(sig, fault);
    errno = saved_errno;
}

/* Ours the current SIGBUS action, remembering the one it replaces. */
static int ensure_installed(void)
{
    struct sigaction cur, ours;
    if (sigaction(SIGBUS, NULL, &cur))
        return -1;
    if ((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == on_sigbus)
        return 0;
    long page = sysconf(_SC_PAGESIZE);
    if (page > 0)
        page_size = (uintptr_t)page;
    previous = cur;
    passed_on = 0;
    memset(&ours, 0, sizeof ours);
    ours.sa_sigaction = on_sigbus;
    ours.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&ours.sa_mask);
    return sigaction(SIGBUS, &ours, NULL);
}

int vhostd_guard_register(uint8_t *start, uint64_t length, int notify_fd)
{
    if (ensure_installed())
        return -2;
    for (int i = 0; i < VHOSTD_GUARD_SLOTS; i++) {
        struct guard_slot *s = &slots[i];
        if (__atomic_load_n(&s->state, __ATOMIC_ACQUIRE) != SLOT_FREE)
            continue;
        s->start = (uintptr_t)start;
        s->length = (uintptr_t)length;
        s->fd = notify_fd;
        __atomic_store_n(&s->lost, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&s->state, SLOT_LIVE, __ATOMIC_RELEASE);
        return i;
    }
    return -1;
}

void vhostd_guard_unregister(int slot)
{
    if (slot >= 0 && slot < VHOSTD_GUARD_SLOTS)
        __atomic_store_n(&slots[slot].state, SLOT_FREE, __ATOMIC_RELEASE);
}

int vhostd_guard_lost(int slot)
{
    if (slot < 0 || slot >= VHOSTD_GUARD_SLOTS)
        return 0;
    return __atomic_load_n(&slots[slot].lost, __ATOMIC_ACQUIRE);
}

uint64_t vhostd_guard_faults(void)
{
    return __atomic_load_n(&faults, __ATOMIC_RELAXED);
}
