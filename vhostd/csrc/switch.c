/* The switch: MAC table, routing and delivery of a burst (switch.h). */
#include <errno.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "ring.h"
#include "switch.h"

/* -- the MAC table: a hash over a list, oldest first (Switch._table) ------ */

static uint32_t mac_hash(const uint8_t *m)
{
    uint64_t v = 0;
    memcpy(&v, m, ETH_ALEN);
    v *= 0x9e3779b97f4a7c15ull;
    return (uint32_t)(v >> 32);
}

static uint32_t *bucket_of(struct vhostd_switch *sw, const uint8_t *mac)
{
    return &sw->bucket[mac_hash(mac) & (sw->nbuckets - 1)];
}

static uint32_t fdb_find(struct vhostd_switch *sw, const uint8_t *mac)
{
    uint32_t i = *bucket_of(sw, mac);
    while (i != SW_NIL && memcmp(sw->e[i].mac, mac, ETH_ALEN) != 0)
        i = sw->e[i].next;
    return i;
}

static void list_unlink(struct vhostd_switch *sw, uint32_t i)
{
    struct vhostd_fdb_entry *x = &sw->e[i];
    if (x->older != SW_NIL)
        sw->e[x->older].newer = x->newer;
    else
        sw->oldest = x->newer;
    if (x->newer != SW_NIL)
        sw->e[x->newer].older = x->older;
    else
        sw->newest = x->older;
}

static void list_append(struct vhostd_switch *sw, uint32_t i)
{
    struct vhostd_fdb_entry *x = &sw->e[i];
    x->older = sw->newest;
    x->newer = SW_NIL;
    if (sw->newest != SW_NIL)
        sw->e[sw->newest].newer = i;
    else
        sw->oldest = i;
    sw->newest = i;
}

static void fdb_remove(struct vhostd_switch *sw, uint32_t i)
{
    uint32_t *link = bucket_of(sw, sw->e[i].mac);
    while (*link != i)
        link = &sw->e[*link].next;
    *link = sw->e[i].next;
    list_unlink(sw, i);
    sw->e[i].next = sw->free;
    sw->free = i;
    sw->count--;
}

/* Switch._route's learning half: smac (unicast) now speaks from src. */
static void fdb_learn(struct vhostd_switch *sw, uint32_t src, const uint8_t *smac)
{
    uint32_t i;
    if (smac[0] & 1)
        return;
    i = fdb_find(sw, smac);
    if (i != SW_NIL && sw->e[i].port == src) {
        if (sw->now - sw->e[i].seen > SW_REFRESH) {
            sw->e[i].seen = sw->now;
            list_unlink(sw, i);
            list_append(sw, i);
        }
        return;
    }
    if (i != SW_NIL) {
        sw->moves++;  /* a migrated guest: its new port owns the MAC at once */
        sw->e[i].port = (uint16_t)src;
        sw->e[i].seen = sw->now;
        list_unlink(sw, i);
        list_append(sw, i);
        return;
    }
    i = sw->free;  /* there is always one: cap + 1 entries, at most cap kept */
    sw->free = sw->e[i].next;
    memcpy(sw->e[i].mac, smac, ETH_ALEN);
    sw->e[i].port = (uint16_t)src;
    sw->e[i].seen = sw->now;
    {
        uint32_t *b = bucket_of(sw, smac);
        sw->e[i].next = *b;
        *b = i;
    }
    list_append(sw, i);
    if (++sw->count > sw->cap)
        fdb_remove(sw, sw->oldest);
}

/* Switch._route's forwarding half: the port dmac lives on, or FLOOD. */
static uint32_t fdb_route(struct vhostd_switch *sw, const uint8_t *dmac)
{
    uint32_t i;
    if (dmac[0] & 1)
        return VHOSTD_SW_FLOOD;
    i = fdb_find(sw, dmac);
    if (i == SW_NIL || !(sw->now - sw->e[i].seen <= sw->ageing))
        return VHOSTD_SW_FLOOD;
    return sw->e[i].port;
}

void vhostd_sw_init(struct vhostd_switch *sw, struct vhostd_fdb_entry *entries, uint32_t cap,
                    uint32_t *buckets, uint32_t nbuckets, double ageing)
{
    uint32_t i;
    sw->e = entries;
    sw->bucket = buckets;
    sw->nbuckets = nbuckets;
    sw->cap = cap;
    sw->count = 0;
    sw->oldest = sw->newest = SW_NIL;
    sw->ageing = ageing;
    for (i = 0; i < nbuckets; i++)
        buckets[i] = SW_NIL;
    for (i = 0; i <= cap; i++)
        entries[i].next = i < cap ? i + 1 : SW_NIL;
    sw->free = 0;
}

/* Switch._route for one frame: learn smac on src; the port for dmac (FLOOD,
   or src itself for a frame to filter). */
int vhostd_sw_lookup(struct vhostd_switch *sw, uint32_t src, const uint8_t *smac,
                     const uint8_t *dmac)
{
    fdb_learn(sw, src, smac);
    return (int)fdb_route(sw, dmac);
}

/* Switch.detach: every MAC learnt on port goes; returns how many. */
uint32_t vhostd_sw_forget(struct vhostd_switch *sw, uint32_t port)
{
    uint32_t i = sw->oldest, gone = 0;
    while (i != SW_NIL) {
        uint32_t next = sw->e[i].newer;
        if (sw->e[i].port == port) {
            fdb_remove(sw, i);
            gone++;
        }
        i = next;
    }
    return gone;
}

/* Switch.expire: entries last seen before cutoff go; returns how many. */
uint32_t vhostd_sw_expire(struct vhostd_switch *sw, double cutoff)
{
    uint32_t i = sw->oldest, gone = 0;
    while (i != SW_NIL) {
        uint32_t next = sw->e[i].newer;
        if (sw->e[i].seen < cutoff) {
            fdb_remove(sw, i);
            gone++;
        }
        i = next;
    }
    return gone;
}

/* Up to max entries, oldest first: MACs (6 bytes each), ports, times seen. */
uint32_t vhostd_sw_dump(const struct vhostd_switch *sw, uint8_t *macs, uint16_t *ports,
                        double *seen, uint32_t max)
{
    uint32_t i = sw->oldest, k = 0;
    for (; i != SW_NIL && k < max; i = sw->e[i].newer, k++) {
        memcpy(macs + ETH_ALEN * (size_t)k, sw->e[i].mac, ETH_ALEN);
        ports[k] = sw->e[i].port;
        seen[k] = sw->e[i].seen;
    }
    return k;
}

/* -- a burst ---------------------------------------------------------------- */

/* List port p among those the burst of n frames goes to, C serving it from
   the first frame unless it is Python's (stop 0); Python may still stop it. */
static void touch(struct vhostd_switch *sw, uint32_t p, uint32_t n)
{
    struct vhostd_sw_port *port = &sw->port[p];
    if (!port->touched) {
        port->touched = 1;
        port->rc = VHOSTD_DONE;
        port->stop = port->kind == VHOSTD_SW_PY ? 0 : n;
        sw->touched[sw->ntouched++] = (uint16_t)p;
    }
}

/* Decide every frame of a burst src sent: dst[k] is a port, FLOOD or FILTER
   (SW_SKIP for a frame too short to switch). Learns as Switch.forward_burst
   does, once per run of frames with the same 12 MAC bytes, counts forwarded,
   flooded and filtered frames, and lists in touched[] the ports the burst
   goes to (cleared first; each port's touched flag with it), each with
   rc VHOSTD_DONE and stop n (0 for a port Python serves). */
void vhostd_sw_route(struct vhostd_switch *sw, uint32_t src, const struct vhostd_frame *frames,
                     uint32_t n, uint16_t *dst)
{
    uint32_t k = 0, i, flood = 0;
    for (i = 0; i < sw->ntouched; i++)
        sw->port[sw->touched[i]].touched = 0;
    sw->ntouched = 0;
    while (k < n) {
        uint32_t end, d;
        if (frames[k].len < SW_MIN_FRAME) {
            dst[k++] = SW_SKIP;
            continue;
        }
        end = vhostd_mac_run(frames, k, n);
        d = vhostd_sw_lookup(sw, src, frames[k].ptr + ETH_ALEN, frames[k].ptr) & 0xffff;
        if (d == src) {
            d = VHOSTD_SW_FILTER;
            sw->filtered += end - k;
        } else if (d == VHOSTD_SW_FLOOD) {
            sw->flooded += end - k;
            flood = 1;
        } else {
            sw->forwarded += end - k;
            touch(sw, d, n);
        }
        for (; k < end; k++)
            dst[k] = (uint16_t)d;
    }
    if (flood) {
        for (i = 0; i < VHOSTD_SW_PORTS; i++)
            if (sw->port[i].attached && i != src)
                touch(sw, i, n);
    }
}

/* A frame into one of a vhost-user port's RX rings (Session.send's pick);
   VHOSTD_DONE when delivered or dropped, else why C stops for this port. */
static int to_rings(struct vhostd_sw_port *p, const struct vhostd_frame *f, uint64_t need)
{
    const uint8_t *fr = f->ptr;
    uint32_t which = p->nrx > 1 ? (uint32_t)(fr[5] ^ fr[11]) % p->nrx : 0;
    struct vhostd_sw_rx *r = &p->rx[which];
    struct vhostd_vq *q = r->vq;
    const uint8_t *hdr = r->hdr;
    uint8_t own[16];
    int rc;
    if (f->len > q->scratch_len)
        return VHOSTD_SLOW;
    if (need) {
        if ((r->features & need) != need || r->hdr_len > sizeof own || r->hdr_len < 10)
            return VHOSTD_SLOW;  /* the receiver cannot take this header: offload.for_receiver */
        memset(own, 0, sizeof own);
        memcpy(own, f->vnet, 10);
        if (r->hdr_len >= 12)
            own[10] = 1;  /* num_buffers */
        hdr = own;
    }
    /* The source is guest memory, maybe of this very guest: copy it aside first. */
    memcpy(q->scratch, fr, f->len);
    rc = vhostd_rx_deliver(q, r->tc, q->scratch, f->len, r->mergeable, r->hdr_len, hdr);
    if (rc == VHOSTD_DONE) {
        q->packets++;
        q->bytes += f->len;
        if (need) {
            if (f->vnet[1])
                r->gso_packets++;
            else if (f->vnet[0] & 1)
                r->csum_partial++;
        }
        return VHOSTD_DONE;
    }
    if (rc == VHOSTD_DROPPED) {
        q->dropped++;
        return VHOSTD_DONE;
    }
    p->need_rx = which;
    return rc;
}

/* A frame to a TAP (TapUplink._write): refused writes are counted, not retried. */
static int to_tap(struct vhostd_sw_port *p, const struct vhostd_frame *f, uint64_t need)
{
    static const uint8_t zero[16];
    struct iovec iov[2];
    ssize_t got;
    int parts = 0;
    if (need && ((p->features & need) != need || p->vnet_len < 10))
        return VHOSTD_SLOW;
    if (p->vnet_len) {
        if (p->vnet_len > sizeof zero)
            return VHOSTD_SLOW;
        iov[0].iov_base = (void *)(uintptr_t)(need ? f->vnet : zero);
        iov[0].iov_len = need ? 10 : p->vnet_len;
        parts = 1;
        if (need && p->vnet_len > 10) {
            iov[1].iov_base = (void *)(uintptr_t)zero;
            iov[1].iov_len = p->vnet_len - 10;
            parts = 2;
        }
    }
    if (parts == 2) {
        struct iovec three[3] = {iov[0], iov[1], {(void *)(uintptr_t)f->ptr, f->len}};
        got = writev(p->fd, three, 3);
    } else if (parts == 1) {
        iov[1].iov_base = (void *)(uintptr_t)f->ptr;
        iov[1].iov_len = f->len;
        got = writev(p->fd, iov, 2);
    } else {
        got = write(p->fd, f->ptr, f->len);
    }
    if (got < 0) {
        p->dropped++;
    } else {
        p->packets++;
        p->bytes += f->len;
        if (need && f->vnet[1])
            p->gso++;
    }
    return VHOSTD_DONE;
}

static void deliver_one(struct vhostd_sw_port *p, const struct vhostd_frame *f, uint64_t need,
                        uint32_t k)
{
    int rc;
    if (k >= p->stop)
        return;  /* Python has this port from p->stop on */
    rc = p->kind == VHOSTD_SW_VHOST ? to_rings(p, f, need)
       : p->kind == VHOSTD_SW_TAP   ? to_tap(p, f, need)
                                    : VHOSTD_SLOW;
    if (rc != VHOSTD_DONE) {
        p->stop = k;
        p->rc = (uint32_t)rc;
    }
}

/* Deliver frames[0, n) to the destinations vhostd_sw_route gave them, in
   order. Python readied every touched port (its rings, or stop = 0 for a port
   it serves itself). need[k] (need may be NULL: all plain) is the feature set
   a receiver must have to take frame k's offload header, frames[k].vnet, as
   it is; a receiver without it stops, and Python finishes the offload. */
void vhostd_sw_deliver(struct vhostd_switch *sw, uint32_t src, const struct vhostd_frame *frames,
                       const uint64_t *need, uint32_t n, const uint16_t *dst)
{
    uint32_t k, i;
    for (k = 0; k < n; k++) {
        uint32_t d = dst[k];
        uint64_t nd = need ? need[k] : 0;
        if (d < VHOSTD_SW_PORTS) {
            deliver_one(&sw->port[d], &frames[k], nd, k);
        } else if (d == VHOSTD_SW_FLOOD) {
            for (i = 0; i < sw->ntouched; i++) {
                uint32_t p = sw->touched[i];
                if (p != src)
                    deliver_one(&sw->port[p], &frames[k], nd, k);
            }
        }
    }
}

/* After Python answered port p's NEED (or whatever stopped it): deliver to p
   alone the frames from start on that vhostd_sw_route gave it. */
void vhostd_sw_resume(struct vhostd_switch *sw, uint32_t src, uint32_t p, uint32_t start,
                      const struct vhostd_frame *frames, const uint64_t *need, uint32_t n,
                      const uint16_t *dst)
{
    struct vhostd_sw_port *port;
    uint32_t k;
    if (p >= VHOSTD_SW_PORTS)
        return;
    port = &sw->port[p];
    for (k = start; k < n; k++) {
        if (dst[k] == p || (dst[k] == VHOSTD_SW_FLOOD && p != src))
            deliver_one(port, &frames[k], need ? need[k] : 0, k);
    }
}

/* TapUplink's read burst: up to max frames from a non-blocking TAP fd, packed
   into buf while room bytes are left for the next one. Frames shorter than an
   Ethernet header are read and counted, not listed. With vnet_len, each read
   starts with that many header bytes: a frame's vnet is set when its header
   asks for an offload (NULL when plain). Returns how many reads succeeded;
   bytes gets their frame bytes. */
uint32_t vhostd_tap_read(int fd, uint8_t *buf, uint64_t buf_len, uint32_t room, uint32_t max,
                         uint32_t vnet_len, struct vhostd_frame *frames, uint64_t *bytes,
                         uint32_t *nframes)
{
    uint64_t used = 0, total = 0;
    uint32_t reads = 0, nf = 0;
    while (reads < max && buf_len - used >= room) {
        ssize_t got = read(fd, buf + used, room);
        uint32_t len;
        if (got < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        reads++;
        if ((uint64_t)got < vnet_len)
            continue;
        len = (uint32_t)((uint64_t)got - vnet_len);
        total += len;
        if (len >= SW_MIN_FRAME) {
            const uint8_t *h = buf + used;
            frames[nf].ptr = buf + used + vnet_len;
            frames[nf].len = len;
            frames[nf].vnet = vnet_len >= 10 && ((h[0] & 1) || h[1]) ? h : NULL;
            nf++;
            used += (uint64_t)got;
        }
    }
    *bytes = total;
    *nframes = nf;
    return reads;
}
