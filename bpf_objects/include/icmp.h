/* ICMP errors generated in place of a packet (destination unreachable, fragmentation needed, time
 * exceeded), back to its sender.  Every one goes through icmp_reply, which applies the rules a host
 * or router keeps (RFC 1812 4.3.2.7, the kernel's icmp_send): no error about an error, a RST or a
 * fragment other than the first, none to a sender that is not a routable unicast host, none for a
 * frame not addressed to this host; and a node-wide token bucket (lb_icmp_rl, like
 * net.ipv4.icmp_msgs_per_sec/_burst) caps how many leave, so a flood of spoofed packets cannot turn
 * the node into a reflector. */
#ifndef BPFLB_ICMP_H
#define BPFLB_ICMP_H

#include "common.h"
#include "maps.h"
#include "parse.h"
#include "nat.h"
#include "fib.h"

#define ICMP_QUOTE_MAX (60 + 8)
#define ICMP_DEST_UNREACH 3
#define ICMP_PORT_UNREACH 3
#define ICMP_FRAG_NEEDED 4
#define ICMP_TIME_EXCEEDED 11
#define ICMP_EXC_TTL 0

#ifndef PACKET_HOST
#define PACKET_HOST 0
#endif

/* The per-node ICMP budget.  Unlike the kernel, fragmentation-needed is not exempt: bpflb only sends it
 * for its own growth (DSR option, overlay) of a flow's packets, and a flood must not buy an unlimited
 * share of the node's errors with large DF packets either. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct lb_icmp_rl);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_icmp_rl SEC(".maps");

/* linux/icmp.h drags in libc headers that do not exist for the BPF target. */
struct icmphdr {
	__u8 type;
	__u8 code;
	__sum16 checksum;
	union {
		struct {
			__be16 id;
			__be16 sequence;
		} echo;
		__be32 gateway;
		struct {
			__be16 __unused;
			__be16 mtu;
		} frag;
	} un;
};   /* the offending IP header with options, plus 8 bytes of L4 */

/* icmp_reply's working memory: per CPU, outside the stack (a program's calls share 512 bytes). */
struct icmp_scratch {
	struct bpf_fib_lookup fib;
	struct {
		struct iphdr ip;
		struct icmphdr icmp;
	} hdr;
	__u8 quote[ICMP_QUOTE_MAX];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct icmp_scratch);
	__uint(max_entries, 1);
} icmp_scratch SEC(".maps");

/* The kernel's defaults (net.ipv4.icmp_msgs_per_sec, icmp_msgs_burst), for a budget the agent has not
 * written yet. */
#define ICMP_RATE_DEFAULT 1000
#define ICMP_BURST_DEFAULT 50

/* May one more ICMP error leave now?  A token bucket of burst errors refilled at rate per second, kept as
 * the generic cell rate algorithm (ATM's GCRA) in one word shared by every CPU: tat, the time the bucket
 * would be full again.  An error is allowed when pushing tat one interval (1 s / rate) further keeps it at
 * most burst intervals ahead of now; the push is a compare-and-swap, so concurrent senders never share a
 * token, and a refused error writes nothing (a flood only reads the word).  Exact: at most
 * burst + rate * t errors in any t seconds.  (The kernel's icmp_global_allow, refilling once empty for
 * the time since the last refill, lets up to twice the burst through after an idle spell.) */
static __always_inline int icmp_rl_allow(void)
{
	__u32 zero = 0;
	struct lb_icmp_rl *rl = bpf_map_lookup_elem(&lb_icmp_rl, &zero);
	__u64 now, tat, next, interval, limit, rate, burst;
	int i;

	if (!rl)
		return 0;
	rate = rl->rate ? rl->rate : ICMP_RATE_DEFAULT;
	burst = rl->burst ? rl->burst : ICMP_BURST_DEFAULT;
	interval = NSEC_PER_SEC / rate;
	if (interval == 0)
		interval = 1;
	limit = burst * interval;
	now = bpf_ktime_get_ns();
	for (i = 0; i < 4; i++) {          /* a lost race retries with the winner's tat */
		tat = rl->tat;
		next = (tat > now ? tat : now) + interval;
		if (next - now > limit)
			return 0;
		if (__sync_val_compare_and_swap(&rl->tat, tat, next) == tat)
			return 1;
	}
	return 0;
}

/* Is the sender of this packet someone an error may be sent to?  Not about a RST (RFC 1122: never
 * answer an error or a reset with an error); not to 0/8, loopback, multicast or class E (which holds
 * the limited broadcast); not for a frame sent to a broadcast or multicast MAC (from_wire).  The
 * node's own addresses and every subnet broadcast are in its local routing table: the FIB lookup of
 * the route back (icmp_reply) refuses them, along with senders that have no route at all. */
static __always_inline int icmp_sender_ok(const struct __sk_buff *skb, const struct pkt *p, int from_wire)
{
	__u8 first = ((const __u8 *)&p->t.saddr)[0];

	if (p->t.proto == IPPROTO_TCP && (p->tcp_flags & TCPF_RST))
		return 0;
	if (first == 0 || first == 127 || first >= 224)
		return 0;
	if (from_wire && skb->pkt_type != PACKET_HOST)
		return 0;
	return 1;
}

/* May an answer the datapath makes (an ICMP error here, a RST in reset.h) go back to this packet's sender?
 * icmp_sender_ok's rules, then, for a packet from the wire, the FIB's route from saddr back to the sender:
 * the node's own addresses and every subnet broadcast (local routes) refuse it, as does having no route.
 * Returns the lookup's result (BPF_FIB_LKUP_RET_SUCCESS, fib filled in, or _NO_NEIGH; 0 when to_stack),
 * or -1: no answer. */
static __always_inline int answer_route(struct __sk_buff *skb, const struct pkt *p, struct bpf_fib_lookup *fib,
					__be32 saddr, __u8 proto, int to_stack)
{
	int rc;

	if (!icmp_sender_ok(skb, p, !to_stack))
		return -1;
	if (to_stack)
		return 0;
	rc = fib_lookup_v4(skb, fib, saddr, p->t.saddr, proto, 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return -1;
	return rc;
}

/* What icmp_reply sends, in one register (a BPF function takes five arguments). */
#define ICMP_WHAT(type, code, mtu) (((__u32)(type) << 24) | ((__u32)(code) << 16) | (__u16)(mtu))

/* Turn the packet into an ICMP error (ICMP_WHAT: type, code, next-hop MTU for fragmentation needed) from
 * saddr to the packet's sender, when the rules above allow it.  From ingress it is routed back like any
 * packet the node forwards (the FIB's route to the sender, the kernel resolving the next hop); from
 * egress (to_stack) it goes back into this node's stack, which delivers it to the local sender.
 * Returns a tc verdict: the error's redirect, or TC_ACT_SHOT (the packet is dropped either way).
 * A BPF function rather than inlined: a program has one copy of it, not one per kind of error (their
 * stacks would not fit in 512 bytes). */
static __attribute__((noinline)) int icmp_reply(struct __sk_buff *skb, const struct pkt *p, __u32 what,
						__be32 saddr, int to_stack)
{
	__u32 zero = 0, qlen = p->ihl_bytes + 8, csum;
	struct icmp_scratch *w = bpf_map_lookup_elem(&icmp_scratch, &zero);
	struct ethhdr eth;
	int rc = 0;

	_Static_assert(sizeof(w->hdr) == 28, "IPv4 + ICMP header must be contiguous");

	if (!w)
		return TC_ACT_SHOT;
	/* Never about a fragment other than the first (RFC 1812 4.3.2.7): it quotes no L4 header. */
	rc = p->frag == PKT_FRAG_LATER ? -1 : answer_route(skb, p, &w->fib, saddr, IPPROTO_ICMP, to_stack);
	if (rc < 0) {
		stat_inc(STAT_ICMP_SUPPRESSED);
		return TC_ACT_SHOT;
	}
	if (!icmp_rl_allow()) {
		stat_inc(STAT_ICMP_RATE_LIMITED);
		return TC_ACT_SHOT;
	}
	if (qlen > ICMP_QUOTE_MAX || qlen < 28)
		return TC_ACT_SHOT;
	__builtin_memset(w->quote, 0, sizeof(w->quote));
	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) < 0)
		return TC_ACT_SHOT;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, w->quote, qlen) < 0)
		return TC_ACT_SHOT;

	/* The kernel's neighbour output rewrites the MACs of a routed error; until then it carries the
	 * swapped ones, or the FIB's when the lookup resolved the neighbour. */
	if (to_stack || rc != BPF_FIB_LKUP_RET_SUCCESS || FIB_TC_SKIPS_NEIGH) {
		__u8 tmp[ETH_ALEN];

		__builtin_memcpy(tmp, eth.h_dest, ETH_ALEN);
		__builtin_memcpy(eth.h_dest, eth.h_source, ETH_ALEN);
		__builtin_memcpy(eth.h_source, tmp, ETH_ALEN);
	} else {
		__builtin_memcpy(eth.h_dest, w->fib.dmac, ETH_ALEN);
		__builtin_memcpy(eth.h_source, w->fib.smac, ETH_ALEN);
	}

	__builtin_memset(&w->hdr, 0, sizeof(w->hdr));
	w->hdr.ip.version = 4;
	w->hdr.ip.ihl = 5;
	w->hdr.ip.tos = 0xc0;
	w->hdr.ip.tot_len = bpf_htons(sizeof(w->hdr) + qlen);
	w->hdr.ip.ttl = 64;
	w->hdr.ip.protocol = IPPROTO_ICMP;
	w->hdr.ip.saddr = saddr;
	w->hdr.ip.daddr = p->t.saddr;
	w->hdr.ip.check = csum_fold32(bpf_csum_diff(NULL, 0, (__be32 *)&w->hdr.ip, sizeof(w->hdr.ip), 0));

	w->hdr.icmp.type = what >> 24;
	w->hdr.icmp.code = (what >> 16) & 0xff;
	w->hdr.icmp.un.frag.mtu = bpf_htons(what & 0xffff);
	/* The quote buffer is zero past qlen, so summing all of it equals summing the quote. */
	csum = bpf_csum_diff(NULL, 0, (__be32 *)&w->hdr.icmp, sizeof(w->hdr.icmp), 0);
	csum = bpf_csum_diff(NULL, 0, (__be32 *)w->quote, sizeof(w->quote), csum);
	w->hdr.icmp.checksum = csum_fold32(csum);

	if (bpf_skb_change_tail(skb, ETH_HLEN + sizeof(w->hdr) + qlen, 0) < 0)
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, 0, &eth, sizeof(eth), 0) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_HLEN, &w->hdr, sizeof(w->hdr), 0) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(w->hdr), w->quote, qlen, 0) < 0)
		return TC_ACT_SHOT;
	stat_inc(STAT_ICMP_SENT);
	if (to_stack)
		return bpf_redirect(skb->ifindex, BPF_F_INGRESS);
	return fib_send(&w->fib);
}

/* Destination unreachable from the address the packet was sent to (the frontend answers). */
static __always_inline int icmp_reply_unreach(struct __sk_buff *skb, const struct pkt *p, __u8 code, __u16 mtu,
					      int to_stack)
{
	return icmp_reply(skb, p, ICMP_WHAT(ICMP_DEST_UNREACH, code, mtu), p->t.daddr, to_stack);
}

static __always_inline int icmp_send_unreach(struct __sk_buff *skb, const struct pkt *p, __u8 code, __u16 mtu)
{
	return icmp_reply_unreach(skb, p, code, mtu, 0);
}

/* Time exceeded in transit, from the node's own address, as a router reports it. */
static __always_inline int icmp_send_time_exceeded(struct __sk_buff *skb, const struct pkt *p, __be32 node_addr)
{
	return icmp_reply(skb, p, ICMP_WHAT(ICMP_TIME_EXCEEDED, ICMP_EXC_TTL, 0), node_addr, 0);
}

/* A packet that would leave with TTL 0: not forwarded (nor translated, nor tracked), counted, answered. */
static __always_inline int icmp_ttl_exceeded(struct __sk_buff *skb, const struct pkt *p, __be32 node_addr)
{
	stat_inc(STAT_DROP_TTL_EXCEEDED);
	return icmp_send_time_exceeded(skb, p, node_addr);
}

#endif
