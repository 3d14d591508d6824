/* Refusing a new flow the node cannot track (no SNAT port left for its backend tuple, conntrack full),
 * never silently: a TCP segment is answered with a RST built here from it (RFC 793's reset rules), a
 * UDP datagram with ICMP port unreachable (icmp.h, which applies the node's ICMP hygiene and rate
 * limit).  The RST keeps the same sender hygiene (icmp.h's answer_route): none to a broadcast,
 * multicast, zero, loopback or own address, an unroutable sender, or a frame not sent to this host, so
 * a spoofed flood on an exhausted tuple reflects nothing.  Each refusal is counted by its reason. */
#ifndef BPFLB_RESET_H
#define BPFLB_RESET_H

#include "common.h"
#include "maps.h"
#include "parse.h"
#include "nat.h"
#include "icmp.h"
#include "flow.h"

/* Turn the TCP segment into the RST its sender gets back (out of the device it came in on): addressed
 * from the frontend it tried, IP options and payload dropped.  A segment carrying an ACK is answered
 * with seq = its ACK; one without, with an ACK of everything it occupied.  Returns a tc verdict. */
static __always_inline int reset_reply(struct __sk_buff *skb, const struct pkt *p)
{
	struct ethhdr eth;
	struct tcphdr th;
	struct {
		struct iphdr ip;
		struct tcphdr tcp;
	} out = {};
	struct {
		__be32 saddr;
		__be32 daddr;
		__u8 zero;
		__u8 proto;
		__be16 len;
	} ph = {};
	__u8 tmp[ETH_ALEN];
	__u32 csum, used, zero = 0;
	/* The route lookup's working memory outside the stack, as icmp_reply keeps it (icmp.h's, per CPU). */
	struct icmp_scratch *w = bpf_map_lookup_elem(&icmp_scratch, &zero);

	_Static_assert(sizeof(out) == 40, "IPv4 + TCP header must be contiguous");

	if (p->tcp_flags & TCPF_RST)
		return TC_ACT_SHOT;     /* a RST is never answered */
	if (!w)
		return TC_ACT_SHOT;
	if (answer_route(skb, p, &w->fib, p->t.daddr, IPPROTO_TCP, 0) < 0) {
		stat_inc(STAT_RESET_SUPPRESSED);
		return TC_ACT_SHOT;
	}
	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) < 0 ||
	    bpf_skb_load_bytes(skb, p->l4_off & 0x7f, &th, sizeof(th)) < 0)
		return TC_ACT_SHOT;
	__builtin_memcpy(tmp, eth.h_dest, ETH_ALEN);
	__builtin_memcpy(eth.h_dest, eth.h_source, ETH_ALEN);
	__builtin_memcpy(eth.h_source, tmp, ETH_ALEN);

	out.ip.version = 4;
	out.ip.ihl = 5;
	out.ip.tot_len = bpf_htons(sizeof(out));
	out.ip.frag_off = bpf_htons(0x4000);   /* DF, as the kernel's own resets */
	out.ip.ttl = 64;
	out.ip.protocol = IPPROTO_TCP;
	out.ip.saddr = p->t.daddr;
	out.ip.daddr = p->t.saddr;
	out.ip.check = csum_fold32(bpf_csum_diff(NULL, 0, (__be32 *)&out.ip, sizeof(out.ip), 0));

	out.tcp.source = p->t.dport;
	out.tcp.dest = p->t.sport;
	out.tcp.doff = 5;
	out.tcp.rst = 1;
	if (th.ack) {
		out.tcp.seq = th.ack_seq;
	} else {
		used = p->tot_len - p->ihl_bytes - th.doff * 4 + th.syn + th.fin;
		out.tcp.ack = 1;
		out.tcp.ack_seq = bpf_htonl(bpf_ntohl(th.seq) + used);
	}
	ph.saddr = out.ip.saddr;
	ph.daddr = out.ip.daddr;
	ph.proto = IPPROTO_TCP;
	ph.len = bpf_htons(sizeof(out.tcp));
	csum = bpf_csum_diff(NULL, 0, (__be32 *)&ph, sizeof(ph), 0);
	csum = bpf_csum_diff(NULL, 0, (__be32 *)&out.tcp, sizeof(out.tcp), csum);
	out.tcp.check = csum_fold32(csum);

	if (bpf_skb_change_tail(skb, ETH_HLEN + sizeof(out), 0) < 0)
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, 0, &eth, sizeof(eth), 0) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_HLEN, &out, sizeof(out), 0) < 0)
		return TC_ACT_SHOT;
	return bpf_redirect(skb->ifindex, 0);
}

/* Answer a new flow np_new_flow could not create (why: NP_NEW_*), and count it. */
static __always_inline int flow_refuse(struct __sk_buff *skb, const struct pkt *p, int why)
{
	if (why == NP_NEW_NO_PORT) {
		stat_inc(STAT_DROP_NAT_EXHAUSTED);
	} else if (why == NP_NEW_CT_FULL) {
		stat_inc(STAT_CT_INSERT_FAILED);
	} else {
		stat_inc(STAT_DROP_ERROR);
		return TC_ACT_SHOT;
	}
	if (p->t.proto == IPPROTO_TCP) {
		if (p->tcp_flags & TCPF_RST)
			return TC_ACT_SHOT;
		if (why == NP_NEW_NO_PORT)
			stat_inc(STAT_RESET_NAT_EXHAUSTED);
		return reset_reply(skb, p);
	}
	if (why == NP_NEW_NO_PORT)
		stat_inc(STAT_ICMP_NAT_EXHAUSTED);
	return icmp_send_unreach(skb, p, ICMP_PORT_UNREACH, 0);
}

#endif
