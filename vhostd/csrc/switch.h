/* The switch in C: the MAC table and a TX burst switched into its destinations.
 *
 * switch.py's Switch is the reference: the same learning, ageing, capacity
 * and move counting, decided once for a run of frames with the same MACs.
 * A burst goes in two calls: vhostd_sw_route learns and decides every frame's
 * destination (and lists the ports it touches, so that Python readies only
 * those), then vhostd_sw_deliver copies each frame into its destinations' RX
 * rings or writes it to a TAP fd. A port C cannot serve from some frame on
 * (no buffer, a translation to ask for, a fault, an offload to finish) stops
 * there: Python hands it that frame and its later ones, in order, through the
 * reference path (Endpoint.send), which decides each exactly as alone.
 *
 * The structures and entry points are declared in vhostd.h (Python calls
 * them); this header holds what only switch.c needs.
 */
#ifndef VHOSTD_SWITCH_H
#define VHOSTD_SWITCH_H

#include "vhostd.h"

#define SW_NIL 0xffffffffu
#define SW_SKIP 0xfffd       /* a frame without a whole Ethernet header: nobody gets it */
#define SW_MIN_FRAME 14
#define SW_REFRESH 1.0       /* seconds before a source's entry is stamped again */
#define ETH_ALEN 6

#endif
