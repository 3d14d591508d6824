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

/* Rewrite the source (is_src) or destination address; 0 on success, negative on helper error. */
static __always_inline int nat_addr(struct __sk_buff *skb, const struct pkt *p, int is_src,
				    __be32 old, __be32 new)
{
	if (old == new)
		return 0;
	if (bpf_l4_csum_replace(skb, p->csum_off, old, new,
				BPF_F_PSEUDO_HDR | sizeof(new) | l4_csum_flags(p)) < 0)
		return -1;
	if (bpf_l3_csum_replace(skb, IP_CSUM_OFF, old, new, sizeof(new)) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, is_src ? IP_SADDR_OFF : IP_DADDR_OFF, &new, sizeof(new), 0);
}

/* Rewrite the source (is_src) or destination port; 0 on success. */
static __always_inline int nat_port(struct __sk_buff *skb, const struct pkt *p, int is_src,
				    __be16 old, __be16 new)
{
	if (old == new)
		return 0;
	if (bpf_l4_csum_replace(skb, p->csum_off, old, new, sizeof(new) | l4_csum_flags(p)) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, p->l4_off + (is_src ? 0 : 2), &new, sizeof(new), 0);
}

/* Rewrite both endpoints of the packet to (saddr:sport -> daddr:dport). */
static __always_inline int nat_rewrite(struct __sk_buff *skb, const struct pkt *p,
				       __be32 saddr, __be16 sport, __be32 daddr, __be16 dport)
{
	if (nat_addr(skb, p, 1, p->t.saddr, saddr) || nat_port(skb, p, 1, p->t.sport, sport))
		return -1;
	if (nat_addr(skb, p, 0, p->t.daddr, daddr) || nat_port(skb, p, 0, p->t.dport, dport))
		return -1;
	return 0;
}

#endif
