/* Forwarding a translated packet: route lookup in the node's FIB, TTL, MACs, redirect. */
#ifndef BPFLB_FIB_H
#define BPFLB_FIB_H

#include "common.h"
#include "maps.h"
#include "parse.h"
#include "nat.h"

/* Decrement the IPv4 TTL (RFC 1624 incremental checksum; not for a freshly built outer header,
 * dec_ttl 0) and set the MACs when given, with direct packet access.  Returns 0, or -1 when the
 * TTL is exhausted or the headers are gone. */
static __always_inline int l2_l3_forward_edit(struct __sk_buff *skb, const __u8 *dmac, const __u8 *smac,
					      int dec_ttl)
{
	void *data = skb_data(skb);
	void *data_end = skb_data_end(skb);
	struct ethhdr *eth = data;
	struct iphdr *ip = data + ETH_HLEN;
	__u32 check;

	if ((void *)(ip + 1) > data_end)
		return -1;
	if (dec_ttl) {
		if (ip->ttl <= 1)
			return -1;
		ip->ttl--;
		check = ip->check;
		check += bpf_htons(0x0100);
		ip->check = (__u16)(check + (check >= 0xFFFF));
	}
	if (dmac) {
		__builtin_memcpy(eth->h_dest, dmac, ETH_ALEN);
		__builtin_memcpy(eth->h_source, smac, ETH_ALEN);
	}
	return 0;
}

/* Route a packet like a router would; fills *fib.  tot_len 0 skips the MTU check (GSO packets
 * are segmented later); otherwise BPF_FIB_LKUP_RET_FRAG_NEEDED reports fib->mtu_result. */
static __always_inline void fib_params(struct bpf_fib_lookup *fib, __be32 saddr, __be32 daddr, __u8 proto,
				       __u16 tot_len, __u32 ifindex)
{
	__builtin_memset(fib, 0, sizeof(*fib));
	fib->family = AF_INET;
	fib->l4_protocol = proto;
	fib->tot_len = tot_len;
	fib->ipv4_src = saddr;
	fib->ipv4_dst = daddr;
	fib->ifindex = ifindex;
}

static __always_inline int fib_lookup_v4(struct __sk_buff *skb, struct bpf_fib_lookup *fib, __be32 saddr,
					 __be32 daddr, __u8 proto, __u16 tot_len)
{
	fib_params(fib, saddr, daddr, proto, tot_len, skb->ingress_ifindex);
	return bpf_fib_lookup(skb, fib, sizeof(*fib), 0);
}

/* Send the (already translated) packet where a successful lookup said (fib_redirect: as a router,
 * decrementing the TTL; fib_redirect_ttl(.., 0) for a packet this node just encapsulated).  TC_ACT_REDIRECT on
 * success; TC_ACT_OK hands it to the kernel stack when the FIB cannot forward it (the stack
 * then answers with the right ICMP error or delivers it). */
static __always_inline int fib_redirect_ttl(struct __sk_buff *skb, struct bpf_fib_lookup *fib, int rc, int dec_ttl)
{
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		if (l2_l3_forward_edit(skb, fib->dmac, fib->smac, dec_ttl) < 0)
			return TC_ACT_OK;   /* TTL exhausted: the stack sends time-exceeded */
		return bpf_redirect(fib->ifindex, 0);
	}
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
		/* The lookup left the next hop in ipv4_dst; let the kernel resolve its MAC. */
		struct bpf_redir_neigh nh = { .nh_family = AF_INET, .ipv4_nh = fib->ipv4_dst };

		if (l2_l3_forward_edit(skb, NULL, NULL, dec_ttl) < 0)
			return TC_ACT_OK;
		return bpf_redirect_neigh(fib->ifindex, &nh, sizeof(nh), 0);
	}
	stat_inc(STAT_PASS_FIB_FAILED);
	return TC_ACT_OK;
}

static __always_inline int fib_redirect(struct __sk_buff *skb, struct bpf_fib_lookup *fib, int rc)
{
	return fib_redirect_ttl(skb, fib, rc, 1);
}

/* Look up and forward in one step, for packets whose size does not change. */
static __always_inline int fib_forward(struct __sk_buff *skb, __be32 saddr, __be32 daddr, __u8 proto)
{
	struct bpf_fib_lookup fib;
	int rc = fib_lookup_v4(skb, &fib, saddr, daddr, proto, 0);

	return fib_redirect(skb, &fib, rc);
}

#endif
