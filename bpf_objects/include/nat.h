/* Address and port rewrites with incremental IPv4 and L4 checksum updates. */
#ifndef BPFLB_NAT_H
#define BPFLB_NAT_H

#include "common.h"
#include "parse.h"
#include "frag.h"

#define IP_CSUM_OFF (ETH_HLEN + offsetof(struct iphdr, check))

/* UDP's checksum 0 means "none": the helpers must keep it 0 and never produce it. */
static __always_inline __u64 l4_csum_flags(const struct pkt *p)
{
	return p->t.proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
}

/* Ones-complement helpers on raw (network-order) words: byte order does not change the sum. */
static __always_inline __u16 csum_fold32(__u32 csum)
{
	csum = (csum & 0xffff) + (csum >> 16);
	csum = (csum & 0xffff) + (csum >> 16);
	return (__u16)~csum;
}

static __always_inline __u32 csum_add32(__u32 csum, __u32 addend)
{
	csum += addend;
	return csum + (csum < addend);
}

static __always_inline __u16 csum_apply(__u16 check, __u32 diff)
{
	__u32 s = csum_add32((__u16)~check, diff);

	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)~s;
}

/* A later fragment of a datagram (no L4 header): the addresses and the IPv4 checksum only; the L4
 * checksum, in the first fragment, was updated there for the whole datagram. */
static __always_inline int nat_rewrite_later_frag(struct __sk_buff *skb, const struct pkt *p, __be32 saddr, __be32 daddr)
{
	void *data = skb_data(skb);
	void *data_end = skb_data_end(skb);
	struct iphdr *ip = data + ETH_HLEN;
	__u32 diff = 0;

	if ((void *)(ip + 1) > data_end)
		return -1;
	diff = csum_add32(diff, ~p->t.saddr);
	diff = csum_add32(diff, saddr);
	diff = csum_add32(diff, ~p->t.daddr);
	diff = csum_add32(diff, daddr);
	ip->saddr = saddr;
	ip->daddr = daddr;
	ip->check = csum_apply(ip->check, diff);
	return 0;
}

/* Rewrite both endpoints of the packet to (saddr:sport -> daddr:dport).
 * The L4 checksum goes through bpf_l4_csum_replace, which alone knows how to keep
 * CHECKSUM_PARTIAL/COMPLETE skbs right (addresses are in the pseudo-header, ports are not);
 * the IPv4 checksum and the fields themselves are written directly.  A fragment's datagram is
 * translated whole (frag.h): the first fragment's ports are recorded, a later one gets the addresses. */
static __always_inline int nat_rewrite(struct __sk_buff *skb, const struct pkt *p,
				       __be32 saddr, __be16 sport, __be32 daddr, __be16 dport)
{
	__u32 addr_diff = 0, l4_off = p->l4_off & 0x7f;
	int addrs = saddr != p->t.saddr || daddr != p->t.daddr;
	int ports = sport != p->t.sport || dport != p->t.dport;
	__be16 to_ports[2] = { sport, dport };
	void *data, *data_end;
	struct iphdr *ip;

	if (p->frag == PKT_FRAG_LATER)
		return nat_rewrite_later_frag(skb, p, saddr, daddr);
	if (addrs) {
		addr_diff = csum_add32(addr_diff, ~p->t.saddr);
		addr_diff = csum_add32(addr_diff, saddr);
		addr_diff = csum_add32(addr_diff, ~p->t.daddr);
		addr_diff = csum_add32(addr_diff, daddr);
		if (bpf_l4_csum_replace(skb, p->csum_off, 0, addr_diff, BPF_F_PSEUDO_HDR | l4_csum_flags(p)) < 0)
			return -1;
	}
	if (ports) {
		__be16 from_ports[2] = { p->t.sport, p->t.dport };
		__be32 old, new;

		__builtin_memcpy(&old, from_ports, sizeof(old));
		__builtin_memcpy(&new, to_ports, sizeof(new));
		if (bpf_l4_csum_replace(skb, p->csum_off, old, new, sizeof(new) | l4_csum_flags(p)) < 0)
			return -1;
	}
	data = skb_data(skb);
	data_end = skb_data_end(skb);
	ip = data + ETH_HLEN;
	if ((void *)(ip + 1) > data_end || data + l4_off + sizeof(to_ports) > data_end)
		return -1;
	if (addrs) {
		ip->saddr = saddr;
		ip->daddr = daddr;
		ip->check = csum_apply(ip->check, addr_diff);
	}
	if (ports)
		__builtin_memcpy(data + l4_off, to_ports, sizeof(to_ports));
	if (p->frag)
		frag_record(p);
	return 0;
}

#endif
