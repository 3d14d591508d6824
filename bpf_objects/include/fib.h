/* Forwarding a translated packet: route lookup in the node's FIB, TTL, and out through the kernel's
 * neighbour subsystem.
 *
 * Every tc redirect is bpf_redirect_neigh to the route's next hop, never bpf_redirect with the MAC the
 * FIB lookup copied: the neighbour entry is then used the way the kernel's own forwarding uses it, so a
 * STALE entry gets re-verified (DELAY, PROBE), a FAILED or deleted one is resolved again, and a MAC that
 * changed is picked up at once.  With plain bpf_redirect the kernel never saw the entry in use and kept
 * a dead MAC for as long as nothing else touched it (75 s measured behind a replaced pod).
 * XDP cannot hand a packet to the neighbour subsystem; neigh.h says when it may use the FIB's MAC. */
#ifndef BPFLB_FIB_H
#define BPFLB_FIB_H

#include "common.h"
#include "maps.h"
#include "parse.h"
#include "nat.h"

/* tc's lookups leave the neighbour to bpf_redirect_neigh (one neighbour lookup per packet, in the
 * kernel's output path, instead of one in the helper and another in the redirect). */
#ifndef FIB_TC_FLAGS
#define FIB_TC_FLAGS BPF_FIB_LOOKUP_SKIP_NEIGH
#endif
#define FIB_TC_SKIPS_NEIGH ((FIB_TC_FLAGS & BPF_FIB_LOOKUP_SKIP_NEIGH) != 0)

/* The IPv4 TTL of the packet at the start of the frame (0 when the header is not there). */
static __always_inline __u8 ip_ttl(void *data, void *data_end)
{
	struct iphdr *ip = data + ETH_HLEN;

	if ((void *)(ip + 1) > data_end)
		return 0;
	return ip->ttl;
}

/* Would forwarding this packet take its TTL to 0?  Such a packet is never translated or tracked: the
 * caller answers it with time exceeded (icmp_send_time_exceeded), as the kernel's ip_forward does. */
static __always_inline int skb_ttl_exhausted(struct __sk_buff *skb)
{
	return ip_ttl(skb_data(skb), skb_data_end(skb)) <= 1;
}

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

/* Route a packet like a router would; fills *fib.  With tot_len, a length beyond the route's MTU gives
 * BPF_FIB_LKUP_RET_FRAG_NEEDED and fib->mtu_result (nothing else filled in).  tot_len 0 (GSO packets,
 * segmented later; packets whose size does not change) checks the skb against the MTU of the route's
 * device only (the helper's is_skb_forwardable, which lets GSO packets through): a lookup that found the
 * route then says FRAG_NEEDED with fib filled in, so fib_redirect hands the packet to the stack rather
 * than to a device that would drop it. */
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

/* On success fib->ipv4_dst holds the next hop (the gateway, or the destination when on-link). */
static __always_inline int fib_lookup_v4(struct __sk_buff *skb, struct bpf_fib_lookup *fib, __be32 saddr,
					 __be32 daddr, __u8 proto, __u16 tot_len)
{
	fib_params(fib, saddr, daddr, proto, tot_len, skb->ingress_ifindex);
	return bpf_fib_lookup(skb, fib, sizeof(*fib), FIB_TC_FLAGS);
}

/* Out of the route's device to its next hop, the kernel resolving (or re-verifying) the neighbour. */
static __always_inline int fib_send(const struct bpf_fib_lookup *fib)
{
	struct bpf_redir_neigh nh = { .nh_family = AF_INET, .ipv4_nh = fib->ipv4_dst };

	return bpf_redirect_neigh(fib->ifindex, &nh, sizeof(nh), 0);
}

/* Send the (already translated) packet where a successful lookup said (fib_redirect: as a router,
 * decrementing the TTL; fib_redirect_ttl(.., 0) for a packet this node just encapsulated).
 * TC_ACT_REDIRECT on success; TC_ACT_OK hands it to the kernel stack when the FIB cannot forward it
 * (the stack then answers with the right ICMP error or delivers it).  Callers check the TTL before
 * translating (skb_ttl_exhausted); one exhausted here anyway is dropped, never passed on translated. */
static __always_inline int fib_redirect_ttl(struct __sk_buff *skb, struct bpf_fib_lookup *fib, int rc, int dec_ttl)
{
	if (rc == BPF_FIB_LKUP_RET_SUCCESS || rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
		/* The kernel's neighbour output writes the MACs; a lookup that resolved them may as well. */
		int edit = rc == BPF_FIB_LKUP_RET_SUCCESS && !FIB_TC_SKIPS_NEIGH ?
			l2_l3_forward_edit(skb, fib->dmac, fib->smac, dec_ttl) :
			l2_l3_forward_edit(skb, NULL, NULL, dec_ttl);

		if (edit < 0) {
			stat_inc(STAT_DROP_TTL_EXCEEDED);
			return TC_ACT_SHOT;
		}
		return fib_send(fib);
	}
	/* Too big for the route (callers count it): the kernel's forwarding fragments it, or answers
	 * fragmentation needed for DF, as a router does. */
	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED)
		return TC_ACT_OK;
	stat_inc(STAT_PASS_FIB_FAILED);
	return TC_ACT_OK;
}

static __always_inline int fib_redirect(struct __sk_buff *skb, struct bpf_fib_lookup *fib, int rc)
{
	return fib_redirect_ttl(skb, fib, rc, 1);
}

/* Does the IPv4 packet at the start of the frame forbid fragmentation (DF)?  Read only for a packet too big
 * for its route, off the common path (a header that is not there counts as DF: nothing is fragmented). */
static __always_inline int skb_ip_df(struct __sk_buff *skb)
{
	void *data = skb_data(skb);
	void *data_end = skb_data_end(skb);
	struct iphdr *ip = data + ETH_HLEN;

	if ((void *)(ip + 1) > data_end)
		return 1;
	return (ip->frag_off & bpf_htons(IP_DF)) != 0;
}

/* Look up and forward in one step.  tot_len 0: the packet's size does not change (the route's device MTU
 * is still checked, fib_params).  With tot_len, for a translated packet whose source is not the node's own
 * (the client's, on the backend's node), when the route may have a smaller MTU than the way it came (a
 * pod's device, a route's mtu): such a packet is too big for a redirect, which the device would drop
 * without a word.  Either way, one too big goes to the kernel's forwarding instead (TC_ACT_OK), which does
 * what a router does: fragments it, or, with DF, answers fragmentation needed (ct_icmp.h translates that
 * error on its way out, as for any error the node's stack sends about a translated packet).  Counted as
 * pass_too_big. */
static __always_inline int fib_forward(struct __sk_buff *skb, __be32 saddr, __be32 daddr, __u8 proto, __u16 tot_len)
{
	struct bpf_fib_lookup fib;
	int rc = fib_lookup_v4(skb, &fib, saddr, daddr, proto, skb->gso_size ? 0 : tot_len);

	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED)
		stat_inc(STAT_PASS_TOO_BIG);
	return fib_redirect(skb, &fib, rc);
}

#endif
