/* The VXLAN overlay (tunnelMode VXLAN): load-balanced requests to a backend on another node, and
 * replies from this node's pods to another node's address, are encapsulated here (UDP 8472, the
 * destination node's VTEP MAC inside); the kernel's VXLAN device decapsulates on the other side. */
#ifndef BPFLB_TUNNEL_H
#define BPFLB_TUNNEL_H

#include "common.h"
#include "maps.h"
#include "parse.h"
#include "nat.h"
#include "icmp.h"
#include "nodes.h"

struct vxlanhdr_ {
	__be32 flags;          /* 0x08000000: the VNI is valid */
	__be32 vni;            /* VNI << 8 */
};

/* The VTEP MAC of a node: 0e:b1 followed by its underlay IPv4 address (the agent gives its VXLAN
 * device the same), so no MAC needs distributing. */
static __always_inline void vtep_mac(__u8 *mac, __be32 node_addr)
{
	mac[0] = 0x0e;
	mac[1] = 0xb1;
	__builtin_memcpy(mac + 2, &node_addr, 4);
}

/* Encapsulate the frame's IP packet in VXLAN from outer_src to outer_dst.  The Ethernet header
 * in front stays (it becomes the outer one; the caller sets its MACs when routing changes them).
 * 0 on success. */
static __always_inline int vxlan_encap(struct __sk_buff *skb, __be32 outer_src, __be32 outer_dst, __u32 vni)
{
	__u64 flags = BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP | BPF_F_ADJ_ROOM_ENCAP_L2_ETH |
		      BPF_F_ADJ_ROOM_ENCAP_L2(ETH_HLEN);
	__u32 hash = bpf_get_hash_recalc(skb);
	struct iphdr ip = {};
	struct udphdr udp = {};
	struct vxlanhdr_ vx = {};
	struct ethhdr inner = {};
	__u32 len;

	if (bpf_skb_adjust_room(skb, VXLAN_OVERHEAD, BPF_ADJ_ROOM_MAC, flags) < 0)
		return -1;
	len = skb->len - ETH_HLEN;
	ip.version = 4;
	ip.ihl = 5;
	ip.tot_len = bpf_htons(len);
	ip.ttl = 64;
	ip.protocol = IPPROTO_UDP;
	ip.saddr = outer_src;
	ip.daddr = outer_dst;
	ip.check = csum_fold32(bpf_csum_diff(NULL, 0, (__be32 *)&ip, sizeof(ip), 0));
	/* Source port from the inner flow's hash, for ECMP entropy on the underlay (RFC 7348). */
	udp.source = bpf_htons(32768 + hash % 28232);
	udp.dest = bpf_htons(VXLAN_PORT);
	udp.len = bpf_htons(len - sizeof(ip));
	vx.flags = bpf_htonl(0x08000000);
	vx.vni = bpf_htonl(vni << 8);
	vtep_mac(inner.h_dest, outer_dst);
	vtep_mac(inner.h_source, outer_src);
	inner.h_proto = bpf_htons(ETH_P_IP);
	if (bpf_skb_store_bytes(skb, ETH_HLEN, &ip, sizeof(ip), 0) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(ip), &udp, sizeof(udp), 0) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(ip) + sizeof(udp), &vx, sizeof(vx), 0) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(ip) + sizeof(udp) + sizeof(vx), &inner, sizeof(inner), 0) < 0)
		return -1;
	return 0;
}

/* Egress: a packet from one of this node's pods to another node's address (a reply to a request
 * that node SNAT'd) goes through the overlay, so no pod address appears on the underlay.
 * Returns a verdict, or -1 when the packet is not for the tunnel. */
static __always_inline int tunnel_egress(struct __sk_buff *skb, const struct pkt *p, const struct lb_config *cfg)
{
	struct lb_tunnel_ep *src, *dst;
	__be32 remote;

	if (cfg->tunnel_mode != TUNNEL_VXLAN || p->t.saddr == cfg->snat_addr)
		return -1;
	src = tunnel_endpoint(p->t.saddr);
	if (!src || src->node_addr != cfg->snat_addr)
		return -1;
	dst = tunnel_endpoint(p->t.daddr);
	if (!dst || dst->node_addr == cfg->snat_addr)
		return -1;
	remote = dst->node_addr;
	if (!skb->gso_size) {
		/* A pod sized for the underlay, not the overlay: tell it (never a silent drop). */
		__u32 mtu = 0;

		if (bpf_check_mtu(skb, 0, &mtu, VXLAN_OVERHEAD, 0) == BPF_MTU_CHK_RET_FRAG_NEEDED) {
			stat_inc(STAT_ICMP_FRAG_NEEDED);
			return icmp_reply_unreach(skb, p, ICMP_FRAG_NEEDED, mtu - VXLAN_OVERHEAD, 1);
		}
	}
	if (vxlan_encap(skb, cfg->snat_addr, remote, cfg->tunnel_vni) < 0) {
		stat_inc(STAT_DROP_ERROR);
		return TC_ACT_SHOT;
	}
	frag_record(p);   /* a first fragment: the rest of its datagram goes the same way */
	stat_inc(STAT_TUNNEL_ENCAP);
	return TC_ACT_OK;
}

#endif
