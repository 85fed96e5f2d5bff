/* What Python may call: the data-path entry points of vhostd's C core.
 *
 * Built by cffi (vhostd/_native_build.py) from the .c files beside this
 * header; the same sources build the sanitizer variant and the fuzz target.
 * The part between the cffi markers is also the cffi declaration, so it
 * holds only declarations cffi can parse: no macros, no includes.
 */
#ifndef VHOSTD_H
#define VHOSTD_H

#include <stdint.h>

/* cffi:begin */

/* Return codes of the burst functions. */
enum vhostd_rc {
    VHOSTD_DONE = 0,     /* finished what was asked */
    VHOSTD_NEED = 1,     /* need_addr/need_perm not in the cache; nothing of that chain taken */
    VHOSTD_FAULT = 2,    /* the driver broke the ring: fault, f_head, f_value, f_limit */
    VHOSTD_SLOW = 3,     /* let the Python reference take the next chain */
    VHOSTD_FULL = 4,     /* TX collect: scratch or frame slots used up; call again */
    VHOSTD_NOBUF = 5,    /* RX: no (or not enough) buffers; nothing taken */
    VHOSTD_DROPPED = 6,  /* RX: frame dropped (chain too small); nothing taken */
    VHOSTD_OTHER = 7     /* RX batch: the next frame hashes to another RX queue */
};

enum { VHOSTD_TC_SLOTS = 32 };

/* A piece of a descriptor chain in local memory, and its guest-physical address. */
struct vhostd_piece { uint8_t *ptr; uint32_t len; uint64_t gpa; };
/* A frame handed between Python and C. TX bursts set vnet to the first ten
   bytes of the chain's virtio-net header when it asks for an offload (NEEDS_CSUM
   or a GSO type; NULL otherwise): Python judges those before passing them on. */
struct vhostd_frame { uint8_t *ptr; uint32_t len; const uint8_t *vnet; };
/* One chain of an RX delivery (merged buffers) or of a TX burst not yet used. */
struct vhostd_head { uint32_t id; uint32_t got; };

/* A dirty log mapping (log.h): bits for pages [0, pages). */
struct vhostd_log {
    uint8_t *bits;
    uint64_t pages;
    uint64_t logged;     /* bits this process set (0 -> 1) */
    uint64_t overflow;   /* writes to pages past the bitmap, not logged */
};

/* One ring for the duration of a call: Python owns the indices and copies
   them in and out around every call. With log set, every write to guest
   memory is logged; the used ring lives at guest-physical log_used.
   packed (packed.h): desc is the descriptor ring, avail/used the driver and
   device event areas, log_used the descriptor ring's guest-physical address;
   last_avail/last_used are positions (bits 0-14 index, bit 15 wrap counter);
   p_ids/p_counts (size entries, shared with packed.py) hold each walked
   chain's buffer id and ring descriptor count by head position, and the
   p_cur_* cursor where the nth chain after p_cur_base starts. */
struct vhostd_vq {
    uint8_t *desc;
    uint8_t *avail;
    uint8_t *used;
    uint32_t size;
    uint32_t indirect;
    uint64_t max_chain_bytes;
    uint16_t last_avail;
    uint16_t last_used;
    uint32_t fault;
    uint64_t f_head;
    uint64_t f_value;
    uint64_t f_limit;
    uint64_t need_addr;
    uint32_t need_perm;
    uint64_t packets;
    uint64_t bytes;
    uint64_t dropped;
    uint64_t bad_header;
    uint64_t vnet_frames;   /* TX: frames collected with an offload header (vnet set) */
    struct vhostd_piece *pieces;
    uint32_t max_pieces;
    struct vhostd_head *heads;
    uint32_t max_heads;
    uint8_t *scratch;
    uint64_t scratch_len;
    struct vhostd_log *log;
    uint64_t log_used;
    uint32_t packed;
    uint16_t *p_ids;
    uint16_t *p_counts;
    uint32_t p_cur_nth;
    uint16_t p_cur_base;
    uint16_t p_cur_pos;
};

/* The translation cache: ranges GuestMemory.extent returned (tcache.h). */
struct vhostd_tcache;

void vhostd_fence(void);
void vhostd_tc_clear(struct vhostd_tcache *c);
void vhostd_tc_insert(struct vhostd_tcache *c, uint64_t addr, uint64_t start,
                      uint64_t last, uint64_t host, uint32_t perm, uint64_t gpa);
void vhostd_log_mark(struct vhostd_log *l, uint64_t gpa, uint64_t len);
int vhostd_tx_burst(struct vhostd_vq *q, struct vhostd_tcache *c, uint32_t skip, uint32_t limit,
                    uint32_t hdr_len, uint32_t max_frame, int collect,
                    struct vhostd_frame *frames, uint32_t *nframes, uint32_t *done);
void vhostd_tx_complete(struct vhostd_vq *q, uint32_t n);
int vhostd_rx_deliver(struct vhostd_vq *q, struct vhostd_tcache *c,
                      const uint8_t *frame, uint32_t flen, int mergeable,
                      uint32_t hdr_len, const uint8_t *hdr);
int vhostd_rx_deliver_batch(struct vhostd_vq *q, struct vhostd_tcache *c,
                            const struct vhostd_frame *frames, uint32_t n, int mergeable,
                            uint32_t hdr_len, const uint8_t *hdr, int swap,
                            uint32_t nsel, uint32_t want, int stop_on_drop, uint32_t *done);
uint32_t vhostd_mac_run(const struct vhostd_frame *frames, uint32_t start, uint32_t n);

/* cffi:end */

#endif
