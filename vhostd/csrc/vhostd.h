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
    uint32_t p_hold;        /* packed, within one C call: 1 hold the first used flags, 2 held */
    uint32_t p_held_at;     /* where the held flags go (packed.h's vhostd_packed_release) */
    uint16_t p_held_flags;
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

/* The switch (switch.h): a MAC table and the ports a TX burst is switched to. */
enum { VHOSTD_SW_PORTS = 1024, VHOSTD_SW_RXQ = 8 };
/* Destinations vhostd_sw_route gives a frame besides a port number. */
enum { VHOSTD_SW_FLOOD = 0xffff, VHOSTD_SW_FILTER = 0xfffe };
/* What a switch port is to C. */
enum { VHOSTD_SW_PY = 0,     /* Python's send() takes every frame (stop = 0) */
       VHOSTD_SW_VHOST = 1,  /* RX rings: rx[0, nrx), picked per frame as Session.send does */
       VHOSTD_SW_TAP = 2 };  /* a TAP fd: one write(2) per frame */

/* One RX ring of a destination, readied by Python for one burst. */
struct vhostd_sw_rx {
    struct vhostd_vq *vq;
    struct vhostd_tcache *tc;
    const uint8_t *hdr;        /* the plain header (num_buffers 1) */
    uint32_t hdr_len;
    uint32_t mergeable;
    uint64_t features;         /* what the receiver negotiated (offload headers) */
    uint64_t gso_packets;      /* offload headers delivered whole, for RxQueue.count_offload */
    uint64_t csum_partial;
};

struct vhostd_sw_port {
    uint32_t kind;
    uint32_t attached;
    uint32_t nrx;
    int32_t fd;                /* TAP */
    uint32_t vnet_len;         /* TAP: virtio-net header bytes before each frame (0: none) */
    uint32_t touched;          /* listed in touched[] this burst */
    uint64_t features;         /* TAP: the offloads the kernel takes */
    uint32_t stop;             /* first frame of the burst C left to Python (>= n: none) */
    uint32_t rc;               /* why: VHOSTD_NOBUF/NEED/FAULT/SLOW, or VHOSTD_DONE */
    uint32_t need_rx;          /* NEED: the ring (rx[need_rx].vq has need_addr/need_perm) */
    uint64_t packets;          /* TAP: written, bytes, refused by the kernel */
    uint64_t bytes;
    uint64_t dropped;
    uint64_t gso;              /* TAP: of those written, GSO super-frames passed whole */
    struct vhostd_sw_rx rx[VHOSTD_SW_RXQ];
};

/* A MAC table entry; the table is a hash over a list oldest -> newest. */
struct vhostd_fdb_entry {
    uint8_t mac[6];
    uint16_t port;
    uint32_t older;
    uint32_t newer;
    uint32_t next;             /* hash chain */
    double seen;
};

struct vhostd_switch {
    struct vhostd_fdb_entry *e;   /* cap + 1 entries (one more than the table keeps) */
    uint32_t *bucket;
    uint32_t nbuckets;            /* a power of two */
    uint32_t cap;
    uint32_t count;
    uint32_t oldest;
    uint32_t newest;
    uint32_t free;
    double now;
    double ageing;
    uint64_t flooded;
    uint64_t forwarded;
    uint64_t moves;
    uint64_t filtered;
    uint32_t ntouched;
    uint16_t touched[VHOSTD_SW_PORTS];
    struct vhostd_sw_port port[VHOSTD_SW_PORTS];
};

void vhostd_sw_init(struct vhostd_switch *sw, struct vhostd_fdb_entry *entries, uint32_t cap,
                    uint32_t *buckets, uint32_t nbuckets, double ageing);
int vhostd_sw_lookup(struct vhostd_switch *sw, uint32_t src, const uint8_t *smac,
                     const uint8_t *dmac);
uint32_t vhostd_sw_forget(struct vhostd_switch *sw, uint32_t port);
uint32_t vhostd_sw_expire(struct vhostd_switch *sw, double cutoff);
uint32_t vhostd_sw_dump(const struct vhostd_switch *sw, uint8_t *macs, uint16_t *ports,
                        double *seen, uint32_t max);
void vhostd_sw_route(struct vhostd_switch *sw, uint32_t src, const struct vhostd_frame *frames,
                     uint32_t n, uint16_t *dst);
void vhostd_sw_deliver(struct vhostd_switch *sw, uint32_t src, const struct vhostd_frame *frames,
                       const uint64_t *need, uint32_t n, const uint16_t *dst);
void vhostd_sw_resume(struct vhostd_switch *sw, uint32_t src, uint32_t p, uint32_t start,
                      const struct vhostd_frame *frames, const uint64_t *need, uint32_t n,
                      const uint16_t *dst);
uint32_t vhostd_tap_read(int fd, uint8_t *buf, uint64_t buf_len, uint32_t room, uint32_t max,
                         uint32_t vnet_len, struct vhostd_frame *frames, uint64_t *bytes,
                         uint32_t *nframes);

/* cffi:end */

#endif
