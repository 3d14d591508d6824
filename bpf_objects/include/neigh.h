/* When XDP may forward with the MAC the FIB lookup returns.
 *
 * bpf_fib_lookup gives the MAC of any neighbour entry the kernel holds as valid, STALE included, and
 * XDP cannot send through the neighbour subsystem: a next hop that only XDP sends to would never be
 * seen in use, never re-verified, and a changed MAC (a replaced node, a client's new machine) would be
 * used for as long as the entry lives.  So XDP forwards only over a resolved entry (anything else goes
 * to tc, which resolves it), and hands a flow start to tc whenever the kernel has not seen bpflb use a
 * next hop for XDP_NEIGH_CHECK_NS: tc sends it with bpf_redirect_neigh, the kernel's state machine runs
 * (STALE -> DELAY -> PROBE -> re-resolution), and XDP follows whatever entry results.  Only flow starts
 * (TCP SYN or SYN-ACK, a UDP datagram) are handed over, so an established TCP flow is never reordered. */
#ifndef BPFLB_NEIGH_H
#define BPFLB_NEIGH_H

#include "common.h"
#include "maps.h"
#include "parse.h"

#ifndef XDP_NEIGH_CHECK_NS
#define XDP_NEIGH_CHECK_NS NSEC_PER_SEC
#endif

/* Next hops XDP forwards to -> when tc last sent something to them for XDP (bpf_ktime_get_ns).  LRU,
 * LB_NEIGH_MAX entries: a next hop pushed out just starts its clock again. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct lb_neigh_key);
	__type(value, __u64);
	__uint(max_entries, LB_NEIGH_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_neigh_seen SEC(".maps");

/* After a successful lookup: must this packet go through tc so the kernel sees its next hop in use?
 * The clock of a next hop starts the first time XDP uses it. */
static __always_inline int xdp_neigh_check_due(const struct bpf_fib_lookup *fib, const struct pkt *p, __u64 now)
{
	struct lb_neigh_key key = { .ifindex = fib->ifindex, .addr = fib->ipv4_dst };
	__u64 *seen;

	if (p->t.proto == IPPROTO_TCP && !(p->tcp_flags & TCPF_SYN))
		return 0;
	seen = bpf_map_lookup_elem(&lb_neigh_seen, &key);
	if (seen && now - *seen < XDP_NEIGH_CHECK_NS)
		return 0;
	bpf_map_update_elem(&lb_neigh_seen, &key, &now, BPF_ANY);
	if (!seen)
		return 0;
	stat_inc(STAT_XDP_NEIGH_CHECK);
	return 1;
}

#endif
