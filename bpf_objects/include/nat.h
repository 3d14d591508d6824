/* Address and port rewrites with incremental IPv4 and L4 checksum updates. */
#ifndef BPFLB_NAT_H
#define BPFLB_NAT_H

#include "common.h"
#include "parse.h"

#define IP_SADDR_OFF (ETH_HLEN + offsetof(struct iphdr, saddr))
#define IP_DADDR_OFF (ETH_HLEN + offsetof(struct iphdr, daddr))
#define IP_CSUM_OFF (ETH_HLEN + offsetof(struct iphdr, check))
#define IP_TTL_OFF (ETH_HLEN + offsetof(struct iphdr, ttl))

/* UDP's checksum 0 means "none": the helpers must keep it 0 and never produce it. */
static __always_inline __u64 l4_csum_flags(const struct pkt *p)
{
	return p->t.proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
}

/* Rewrite both endpoints of the packet to (saddr:sport -> daddr:dport).  Source and destination
 * are adjacent in both headers, so each pair costs one checksum delta and one store.  Addresses
 * are part of the L4 pseudo-header (BPF_F_PSEUDO_HDR keeps CHECKSUM_PARTIAL packets right);
 * ports are not. */
static __always_inline int nat_rewrite(struct __sk_buff *skb, const struct pkt *p,
				       __be32 saddr, __be16 sport, __be32 daddr, __be16 dport)
{
	if (saddr != p->t.saddr || daddr != p->t.daddr) {
		__be32 from[2] = { p->t.saddr, p->t.daddr };
		__be32 to[2] = { saddr, daddr };
		__s64 diff = bpf_csum_diff(from, sizeof(from), to, sizeof(to), 0);

		if (diff < 0)
			return -1;
		if (bpf_l4_csum_replace(skb, p->csum_off, 0, diff, BPF_F_PSEUDO_HDR | l4_csum_flags(p)) < 0 ||
		    bpf_l3_csum_replace(skb, IP_CSUM_OFF, 0, diff, 0) < 0 ||
		    bpf_skb_store_bytes(skb, IP_SADDR_OFF, to, sizeof(to), 0) < 0)
			return -1;
	}
	if (sport != p->t.sport || dport != p->t.dport) {
		__be16 from[2] = { p->t.sport, p->t.dport };
		__be16 to[2] = { sport, dport };
		__be32 old, new;

		__builtin_memcpy(&old, from, sizeof(old));
		__builtin_memcpy(&new, to, sizeof(new));
		if (bpf_l4_csum_replace(skb, p->csum_off, old, new, sizeof(new) | l4_csum_flags(p)) < 0 ||
		    bpf_skb_store_bytes(skb, p->l4_off, to, sizeof(to), 0) < 0)
			return -1;
	}
	return 0;
}

#endif
