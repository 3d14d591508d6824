/* Forwarding a translated packet: route lookup in the node's FIB, TTL, MACs, redirect. */
#ifndef BPFLB_FIB_H
#define BPFLB_FIB_H

#include "common.h"
#include "maps.h"
#include "parse.h"
#include "nat.h"

/* Decrement the IPv4 TTL with its checksum; returns the TTL before, 0 on error. */
static __always_inline __u8 ttl_dec(struct __sk_buff *skb)
{
	__u8 ttl;

	if (bpf_skb_load_bytes(skb, IP_TTL_OFF, &ttl, 1) < 0 || ttl <= 1)
		return 0;
	/* TTL is the high byte of the 16-bit word it shares with the protocol. */
	bpf_l3_csum_replace(skb, IP_CSUM_OFF, bpf_htons((__u16)ttl << 8), bpf_htons((__u16)(ttl - 1) << 8), 2);
	ttl -= 1;
	bpf_skb_store_bytes(skb, IP_TTL_OFF, &ttl, 1, 0);
	return ttl + 1;
}

/* Send the (already translated) packet towards its destination like a router would.
 * TC_ACT_REDIRECT on success; TC_ACT_OK hands it to the kernel stack when the FIB
 * cannot forward it (the stack then answers with the right ICMP error or delivers it). */
static __always_inline int fib_forward(struct __sk_buff *skb, __be32 saddr, __be32 daddr, __u8 proto,
				       __u16 tot_len)
{
	struct bpf_fib_lookup fib = {};
	int rc;

	fib.family = AF_INET;
	fib.l4_protocol = proto;
	fib.tot_len = tot_len;
	fib.ipv4_src = saddr;
	fib.ipv4_dst = daddr;
	fib.ifindex = skb->ingress_ifindex;

	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		if (!ttl_dec(skb))
			return TC_ACT_OK;
		if (bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_dest), fib.dmac, ETH_ALEN, 0) < 0 ||
		    bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_source), fib.smac, ETH_ALEN, 0) < 0)
			return TC_ACT_SHOT;
		return bpf_redirect(fib.ifindex, 0);
	}
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
		/* The lookup left the next hop in ipv4_dst; let the kernel resolve its MAC. */
		struct bpf_redir_neigh nh = { .nh_family = AF_INET, .ipv4_nh = fib.ipv4_dst };

		if (!ttl_dec(skb))
			return TC_ACT_OK;
		return bpf_redirect_neigh(fib.ifindex, &nh, sizeof(nh), 0);
	}
	stat_inc(STAT_PASS_FIB_FAILED);
	return TC_ACT_OK;
}

#endif
