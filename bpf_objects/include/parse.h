/* Packet parsing: Ethernet + IPv4 + TCP/UDP into a struct pkt, refusing anything malformed. */
#ifndef BPFLB_PARSE_H
#define BPFLB_PARSE_H

#include "common.h"

enum parse_result {
	PARSE_OK = 0,        /* a whole, unfragmented IPv4 TCP/UDP header: may be translated */
	PARSE_NOT_IPV4,      /* another EtherType: not ours */
	PARSE_OTHER_L4,      /* IPv4 but not TCP/UDP: not ours */
	PARSE_FRAGMENT,      /* an IP fragment: translated only as part of a datagram frag.h follows */
	PARSE_TRUNCATED,     /* headers cut short or inconsistent: never translated */
};

struct pkt {
	struct ct_tuple t;   /* as on the wire, network byte order */
	__u32 l4_off;        /* offset of the TCP/UDP header from the start of the frame */
	__u32 csum_off;      /* offset of the L4 checksum field */
	__u16 tot_len;       /* IPv4 total length, host order */
	__u8 tcp_flags;      /* TCP flag byte (FIN 0x01, SYN 0x02, RST 0x04, ACK 0x10), 0 for UDP */
	__u8 ihl_bytes;      /* IPv4 header length including options */
	__u32 seq;           /* TCP sequence and acknowledgment numbers, host order (0 for UDP) */
	__u32 ack;
	__be16 ip_id;        /* IPv4 identification (fragments only) */
	__u8 frag;           /* PKT_FRAG_*: which part of a fragmented datagram this is */
	__u8 pad;
};

/* pkt.frag.  A first fragment (offset 0, MF) carries the L4 header, parsed as usual (its length checks
 * allow for the rest of the datagram); a later one carries none: its ports are 0 until frag.h finds
 * the first one's.  A first fragment whose L4 header is cut short stays PKT_FRAG_NONE (untrackable). */
#define PKT_FRAG_NONE 0
#define PKT_FRAG_FIRST 1
#define PKT_FRAG_LATER 2

#define TCPF_FIN 0x01
#define TCPF_SYN 0x02
#define TCPF_RST 0x04
#define TCPF_ACK 0x10

/* The TCP/UDP header at l4 (ip: its IPv4 header, ihl and tot_len checked).  first_frag: the packet is
 * the first fragment of a datagram, whose UDP length covers the whole datagram (a constant per call
 * site, so the unfragmented path compiles as if this did not exist). */
static __always_inline enum parse_result parse_l4(struct iphdr *ip, __u32 ihl, __u32 tot_len, void *data_end,
						  struct pkt *p, int first_frag)
{
	if (ip->protocol == IPPROTO_TCP) {
		struct tcphdr *th = (void *)ip + ihl;

		if ((void *)(th + 1) > data_end || tot_len < ihl + sizeof(*th))
			return PARSE_TRUNCATED;
		if (th->doff < 5 || tot_len < ihl + th->doff * 4)
			return PARSE_TRUNCATED;
		p->t.sport = th->source;
		p->t.dport = th->dest;
		p->tcp_flags = ((__u8 *)th)[13];
		p->seq = bpf_ntohl(th->seq);
		p->ack = bpf_ntohl(th->ack_seq);
		p->csum_off = p->l4_off + offsetof(struct tcphdr, check);
		return PARSE_OK;
	}
	if (ip->protocol == IPPROTO_UDP) {
		struct udphdr *uh = (void *)ip + ihl;

		if ((void *)(uh + 1) > data_end || tot_len < ihl + sizeof(*uh))
			return PARSE_TRUNCATED;
		if (bpf_ntohs(uh->len) < sizeof(*uh))
			return PARSE_TRUNCATED;
		/* A whole datagram holds its UDP length; a first fragment holds less, the rest follows. */
		if (first_frag ? bpf_ntohs(uh->len) <= tot_len - ihl : bpf_ntohs(uh->len) > tot_len - ihl)
			return PARSE_TRUNCATED;
		p->t.sport = uh->source;
		p->t.dport = uh->dest;
		p->tcp_flags = 0;
		p->csum_off = p->l4_off + offsetof(struct udphdr, check);
		return PARSE_OK;
	}
	return PARSE_OTHER_L4;
}

/* What every IPv4 packet tells, fragment or not. */
static __always_inline void parse_ip(struct iphdr *ip, __u32 ihl, __u32 tot_len, struct pkt *p)
{
	p->t.saddr = ip->saddr;
	p->t.daddr = ip->daddr;
	p->t.proto = ip->protocol;
	p->t.pad[0] = p->t.pad[1] = p->t.pad[2] = 0;
	p->tot_len = tot_len;
	p->ihl_bytes = ihl;
	p->l4_off = ETH_HLEN + ihl;
}

/* A fragment (ip's MF or offset set): addresses, protocol and IP id; a first fragment's ports too.
 * Always PARSE_FRAGMENT, so a caller that does not follow fragments (XDP, the ICMP paths) passes it. */
static __always_inline enum parse_result parse_fragment(struct iphdr *ip, __u32 ihl, __u32 tot_len, void *data_end,
							 struct pkt *p)
{
	parse_ip(ip, ihl, tot_len, p);
	p->ip_id = ip->id;
	if (ip->frag_off & bpf_htons(IP_OFFSET))
		p->frag = PKT_FRAG_LATER;
	else if (parse_l4(ip, ihl, tot_len, data_end, p, 1) == PARSE_OK)
		p->frag = PKT_FRAG_FIRST;
	return PARSE_FRAGMENT;
}

/* Parse Ethernet + IPv4 + TCP/UDP between data and data_end (len: the whole frame's length);
 * the verdict says whether the packet may be translated.  Shared by tc and XDP. */
static __always_inline enum parse_result parse_frame(void *data, void *data_end, __u32 len, struct pkt *p)
{
	struct ethhdr *eth = data;
	struct iphdr *ip;
	__u32 ihl, tot_len;

	if ((void *)(eth + 1) > data_end)
		return PARSE_TRUNCATED;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return PARSE_NOT_IPV4;
	ip = data + ETH_HLEN;
	if ((void *)(ip + 1) > data_end)
		return PARSE_TRUNCATED;
	if (ip->version != 4 || ip->ihl < 5)
		return PARSE_TRUNCATED;
	ihl = ip->ihl * 4;
	tot_len = bpf_ntohs(ip->tot_len);
	if (tot_len < ihl || tot_len > len - ETH_HLEN)
		return PARSE_TRUNCATED;
	if (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET))
		return parse_fragment(ip, ihl, tot_len, data_end, p);

	parse_ip(ip, ihl, tot_len, p);
	return parse_l4(ip, ihl, tot_len, data_end, p, 0);
}

/* tc: headers of a non-linear skb may sit outside the linear area; pull them in once, then parse. */
static __always_inline enum parse_result parse_pkt(struct __sk_buff *skb, struct pkt *p)
{
	__u32 want = skb->len;

	if (want > ETH_HLEN + 60 + sizeof(struct tcphdr))
		want = ETH_HLEN + 60 + sizeof(struct tcphdr);
	if (skb_data(skb) + want > skb_data_end(skb))
		bpf_skb_pull_data(skb, want);
	return parse_frame(skb_data(skb), skb_data_end(skb), skb->len, p);
}

#endif
