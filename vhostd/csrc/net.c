/* virtio-net over split and packed rings: TX bursts and RX delivery (net.py,
   check for check); the ring primitives of ring.h pick the layout. */
#include "ring.h"

#define MIN_FRAME 14

/* TxQueue.burst's walk: after the skip chains already taken, take up to limit
   more, collect their frames (or only count them) and record their heads in
   q->heads from skip on, without returning them: the caller hands the frames
   on, and once the whole burst went, returns it with vhostd_tx_complete. So
   every frame is read before any chain of its burst goes back to the driver,
   however the burst was split into calls. */
int vhostd_tx_burst(struct vhostd_vq *q, struct vhostd_tcache *c, uint32_t skip, uint32_t limit,
                    uint32_t hdr_len, uint32_t max_frame, int collect,
                    struct vhostd_frame *frames, uint32_t *nframes, uint32_t *done_out)
{
    uint32_t n, done = 0, nf = 0;
    uint64_t scratch_used = 0;
    int rc = vhostd_avail_count(q, &n);
    if (rc)
        goto out;
    n = n > skip ? n - skip : 0;
    if (n > limit)
        n = limit;
    if (skip >= q->max_heads)
        n = 0;
    else if (n > q->max_heads - skip)
        n = q->max_heads - skip;
    while (done < n) {
        uint32_t head, np = 0, first_len;
        uint64_t total;
        int64_t size;
        if ((rc = vhostd_head_at(q, skip + done, &head))) {
            if (rc == VHOSTD_NOBUF)
                rc = VHOSTD_DONE;                 /* packed: no more chains */
            break;
        }
        if ((rc = vhostd_walk(q, c, head, 0, &np, &total, &first_len)))
            break;
        size = (int64_t)total - (int64_t)hdr_len;
        if (size < MIN_FRAME || size > (int64_t)max_frame) {
            q->dropped++;
            if (size > (int64_t)max_frame)
                q->bad_header++;                  /* frame_too_big */
        } else {
            const struct vhostd_piece *p = q->pieces;
            const uint8_t *vnet = NULL;
            if (p[0].len < 2) {
                rc = VHOSTD_SLOW;                 /* a header split too finely to judge here */
                break;
            }
            if ((p[0].ptr[0] & 1) || p[0].ptr[1] != 0) {
                /* NEEDS_CSUM or a GSO type: Python judges the header against the
                   frame (offload.check_tx) before any frame of the burst goes on;
                   counted here as sent, and uncounted there if refused. */
                if (!collect || p[0].len < 10) {
                    rc = VHOSTD_SLOW;
                    break;
                }
                vnet = p[0].ptr;
                q->vnet_frames++;
            }
            {
                if (collect) {
                    uint32_t k = 0, off = hdr_len;
                    while (k < np && off >= p[k].len) {
                        off -= p[k].len;
                        k++;
                    }
                    if (p[k].len - off >= (uint64_t)size) {
                        frames[nf].ptr = p[k].ptr + off;    /* contiguous: no copy */
                    } else {
                        uint8_t *dst;
                        uint64_t left = (uint64_t)size;
                        if ((uint64_t)size > q->scratch_len - scratch_used) {
                            rc = VHOSTD_FULL;
                            break;
                        }
                        dst = q->scratch + scratch_used;
                        frames[nf].ptr = dst;
                        for (; left; k++, off = 0) {
                            uint64_t m = p[k].len - off;
                            if (m > left)
                                m = left;
                            memcpy(dst, p[k].ptr + off, m);
                            dst += m;
                            left -= m;
                        }
                        scratch_used += (uint64_t)size;
                    }
                    frames[nf].len = (uint32_t)size;
                    frames[nf].vnet = vnet;
                    nf++;
                }
                q->packets++;
                q->bytes += (uint64_t)size;
            }
        }
        q->heads[skip + done].id = head;
        done++;
    }
out:
    *done_out = done;
    *nframes = nf;
    return rc;
}

/* Return the first n chains of q->heads, in order, as used (written 0 bytes).
   One pass over consecutive used slots, one division, and the log marked per
   run of slots rather than per entry (the same pages). */
void vhostd_tx_complete(struct vhostd_vq *q, uint32_t n)
{
    uint32_t k, slot, first;
    uint8_t *ring = q->used + 4;
    if (n > q->max_heads)
        n = q->max_heads;
    if (!n)
        return;
    if (q->packed) {
        vhostd_packed_hold(q);
        for (k = 0; k < n; k++)
            vhostd_packed_put(q, q->heads[k].id, 0);
        vhostd_packed_release(q);
        return;
    }
    first = slot = q->last_used % q->size;
    for (k = 0; k < n; k++) {
        uint32_t elem[2] = {q->heads[k].id, 0};
        memcpy(ring + 8 * (size_t)slot, elem, 8);
        if (++slot == q->size)
            slot = 0;
    }
    if (q->log) {
        uint32_t run = q->size - first < n ? q->size - first : n;
        vhostd_log_write(q->log, q->log_used + 4 + 8 * (uint64_t)first, 8 * (uint64_t)run);
        if (run < n)
            vhostd_log_write(q->log, q->log_used + 4, 8 * (uint64_t)(n - run));
    }
    q->last_used = (uint16_t)(q->last_used + n);
    q->last_avail = (uint16_t)(q->last_avail + n);
}

/* Log the first len bytes of the pieces as written. */
static void log_pieces(struct vhostd_vq *q, uint32_t np, uint64_t len)
{
    uint32_t k;
    for (k = 0; k < np && len; k++) {
        uint64_t m = q->pieces[k].len < len ? q->pieces[k].len : len;
        vhostd_log_write(q->log, q->pieces[k].gpa, m);
        len -= m;
    }
}

/* Copy data into pieces starting offset bytes into them (RxQueue's _scatter). */
static void scatter(const struct vhostd_piece *p, uint32_t np, uint64_t offset,
                    const uint8_t *data, uint64_t len)
{
    uint32_t k;
    for (k = 0; k < np && len; k++) {
        uint64_t m;
        if (offset >= p[k].len) {
            offset -= p[k].len;
            continue;
        }
        m = p[k].len - offset;
        if (m > len)
            m = len;
        memcpy(p[k].ptr + offset, data, m);
        data += m;
        len -= m;
        offset = 0;
    }
}

int vhostd_rx_deliver(struct vhostd_vq *q, struct vhostd_tcache *c,
                      const uint8_t *frame, uint32_t flen, int mergeable,
                      uint32_t hdr_len, const uint8_t *hdr)
{
    uint64_t need_bytes = (uint64_t)hdr_len + flen, room = 0, total;
    uint32_t avail, head, np = 0, first_len, nheads = 0, k;
    int rc = vhostd_avail_count(q, &avail);
    if (rc)
        return rc;
    if (!mergeable) {
        if (avail == 0)
            return VHOSTD_NOBUF;
        if ((rc = vhostd_head_at(q, 0, &head)))
            return rc;
        if ((rc = vhostd_walk(q, c, head, 1, &np, &total, &first_len)))
            return rc;
        if (total < hdr_len)
            return vhostd_fault(q, F_RX_SMALL, head, total, hdr_len);
        if (total < need_bytes)
            return VHOSTD_DROPPED;
        scatter(q->pieces, np, 0, hdr, hdr_len);
        scatter(q->pieces, np, hdr_len, frame, flen);
        if (q->log)
            log_pieces(q, np, need_bytes);
        vhostd_put(q, head, (uint32_t)need_bytes);
        return VHOSTD_DONE;
    }
    while (room < need_bytes) {
        if (nheads == avail)
            return VHOSTD_NOBUF;
        if (nheads >= q->max_heads)
            return VHOSTD_SLOW;
        if ((rc = vhostd_head_at(q, nheads, &head)))
            return rc;
        if ((rc = vhostd_walk(q, c, head, 1, &np, &total, &first_len)))
            return rc;
        if (total < hdr_len)
            return vhostd_fault(q, F_RX_SMALL, head, total, hdr_len);
        q->heads[nheads].id = head;
        q->heads[nheads].got = (uint32_t)total;  /* <= 4 GiB: max_chain_bytes bounds it */
        nheads++;
        room += total;
    }
    {
        uint8_t h[64] = {0};
        uint64_t left = need_bytes;
        if (hdr_len > sizeof h)
            return VHOSTD_SLOW;
        memcpy(h, hdr, hdr_len);
        if (hdr_len >= 12) {
            h[10] = (uint8_t)nheads;
            h[11] = (uint8_t)(nheads >> 8);
        }
        scatter(q->pieces, np, 0, h, hdr_len);
        scatter(q->pieces, np, hdr_len, frame, flen);
        if (q->log)
            log_pieces(q, np, need_bytes);
        for (k = 0; k < nheads; k++) {
            uint64_t used = q->heads[k].got < left ? q->heads[k].got : left;
            vhostd_put(q, q->heads[k].id, (uint32_t)used);
            left -= used;
        }
    }
    return VHOSTD_DONE;
}

/* RxQueue.deliver for each of n frames in order, stopping before the first one
   that is neither delivered nor dropped (its rc is returned, *done frames were
   handled and counted in packets/bytes/dropped). With nsel > 1 RX queues, it
   also stops before a frame that Session.send would hash to another queue than
   want, and with stop_on_drop after the first frame dropped (a source port's
   template does not fit the buffer: every later copy would not either).
   Each frame is first copied to q->scratch, MACs swapped if asked (what
   Port._reflect's bytearray does): the source may be guest memory that this
   very delivery overwrites. */
int vhostd_rx_deliver_batch(struct vhostd_vq *q, struct vhostd_tcache *c,
                            const struct vhostd_frame *frames, uint32_t n, int mergeable,
                            uint32_t hdr_len, const uint8_t *hdr, int swap,
                            uint32_t nsel, uint32_t want, int stop_on_drop, uint32_t *done)
{
    uint32_t k;
    int rc = VHOSTD_DONE;
    for (k = 0; k < n; k++) {
        const uint8_t *f = frames[k].ptr;
        uint32_t flen = frames[k].len;
        if (flen > q->scratch_len || (flen < 12 && (swap || nsel > 1))) {
            rc = VHOSTD_SLOW;
            break;
        }
        if (nsel > 1 && (uint32_t)(f[5] ^ f[11]) % nsel != want) {
            rc = VHOSTD_OTHER;
            break;
        }
        if (swap) {
            memcpy(q->scratch, f + 6, 6);
            memcpy(q->scratch + 6, f, 6);
            memcpy(q->scratch + 12, f + 12, flen - 12);
        } else {
            memcpy(q->scratch, f, flen);
        }
        rc = vhostd_rx_deliver(q, c, q->scratch, flen, mergeable, hdr_len, hdr);
        if (rc == VHOSTD_DONE) {
            q->packets++;
            q->bytes += flen;
        } else if (rc == VHOSTD_DROPPED) {
            q->dropped++;
            rc = VHOSTD_DONE;
            if (stop_on_drop) {
                k++;
                break;
            }
        } else {
            break;
        }
    }
    *done = k;
    return rc;
}

/* Where the run of frames with the same 12 MAC bytes as frames[start] ends
   (frames[start, result) share them; at least start + 1). The switch decides
   once per run: learning the same source twice in a burst changes nothing. */
uint32_t vhostd_mac_run(const struct vhostd_frame *frames, uint32_t start, uint32_t n)
{
    const uint8_t *m = frames[start].ptr;
    uint32_t k = start + 1;
    if (frames[start].len < 12)
        return k;
    while (k < n && frames[k].len >= 12 && memcmp(frames[k].ptr, m, 12) == 0)
        k++;
    return k;
}
