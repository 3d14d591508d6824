/* ICMP errors generated in place of a packet: destination unreachable back to its sender. */
#ifndef BPFLB_ICMP_H
#define BPFLB_ICMP_H

#include "common.h"
#include "parse.h"
#include "nat.h"

#define ICMP_QUOTE_MAX (60 + 8)
#define ICMP_DEST_UNREACH 3
#define ICMP_PORT_UNREACH 3
#define ICMP_FRAG_NEEDED 4

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


/* Turn the packet into an ICMP destination-unreachable (type 3, code, next-hop MTU for code 4)
 * addressed to its sender.  From ingress it goes back out of the device it came in on; from
 * egress (to_stack) it goes back into this node's stack, which delivers it to the local sender.
 * Returns a tc verdict. */
static __always_inline int icmp_reply_unreach(struct __sk_buff *skb, const struct pkt *p, __u8 code, __u16 mtu,
					      int to_stack)
{
	__u8 quote[ICMP_QUOTE_MAX] = {};
	struct ethhdr eth;
	struct {
		struct iphdr ip;
		struct icmphdr icmp;
	} hdr = {};
	__u32 qlen = p->ihl_bytes + 8;
	__u32 csum;
	__u8 tmp[ETH_ALEN];

	_Static_assert(sizeof(hdr) == 28, "IPv4 + ICMP header must be contiguous");

	if (qlen > ICMP_QUOTE_MAX || qlen < 28)
		return TC_ACT_SHOT;
	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) < 0)
		return TC_ACT_SHOT;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, quote, qlen) < 0)
		return TC_ACT_SHOT;

	__builtin_memcpy(tmp, eth.h_dest, ETH_ALEN);
	__builtin_memcpy(eth.h_dest, eth.h_source, ETH_ALEN);
	__builtin_memcpy(eth.h_source, tmp, ETH_ALEN);

	hdr.ip.version = 4;
	hdr.ip.ihl = 5;
	hdr.ip.tos = 0xc0;
	hdr.ip.tot_len = bpf_htons(sizeof(hdr) + qlen);
	hdr.ip.ttl = 64;
	hdr.ip.protocol = IPPROTO_ICMP;
	hdr.ip.saddr = p->t.daddr;
	hdr.ip.daddr = p->t.saddr;
	hdr.ip.check = csum_fold32(bpf_csum_diff(NULL, 0, (__be32 *)&hdr.ip, sizeof(hdr.ip), 0));

	hdr.icmp.type = ICMP_DEST_UNREACH;
	hdr.icmp.code = code;
	hdr.icmp.un.frag.mtu = bpf_htons(mtu);
	/* The quote buffer is zero past qlen, so summing all of it equals summing the quote. */
	csum = bpf_csum_diff(NULL, 0, (__be32 *)&hdr.icmp, sizeof(hdr.icmp), 0);
	csum = bpf_csum_diff(NULL, 0, (__be32 *)quote, sizeof(quote), csum);
	hdr.icmp.checksum = csum_fold32(csum);

	if (bpf_skb_change_tail(skb, ETH_HLEN + sizeof(hdr) + qlen, 0) < 0)
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, 0, &eth, sizeof(eth), 0) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_HLEN, &hdr, sizeof(hdr), 0) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(hdr), quote, qlen, 0) < 0)
		return TC_ACT_SHOT;
	return bpf_redirect(skb->ifindex, to_stack ? BPF_F_INGRESS : 0);
}

static __always_inline int icmp_send_unreach(struct __sk_buff *skb, const struct pkt *p, __u8 code, __u16 mtu)
{
	return icmp_reply_unreach(skb, p, code, mtu, 0);
}

#endif
