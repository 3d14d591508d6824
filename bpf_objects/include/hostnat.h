/* The node's own connections against SNAT'd flows.  The SNAT range overlaps the node's ephemeral ports
 * (as Cilium's does), so a connection the node opens may start from a port that a live SNAT'd flow
 * holds towards the same backend tuple; its replies would then go to that flow's client.  Such a
 * connection is moved here, on its way out, to a free port of the pool, and its replies moved back
 * (CT_F_HOST entries: an SNAT'd flow whose client is the node), as nf_nat's clash resolution and
 * Cilium's host SNAT do.  Nothing else of the node's traffic is touched.  (The other direction, the
 * pool never handing out a port a node socket uses, is natpool.h's socket lookup.) */
#ifndef BPFLB_HOSTNAT_H
#define BPFLB_HOSTNAT_H

#include "common.h"
#include "maps.h"
#include "parse.h"
#include "nat.h"
#include "conntrack.h"
#include "natpool.h"

/* Was this packet sent by a socket of this node with exactly its tuple?  skb->sk alone does not say: a
 * packet that crossed a veth keeps its sender's socket from the other namespace, so a request this node
 * translated and forwarded carries its client's socket, whose addresses are the client's. */
static __always_inline int hostnat_own(struct __sk_buff *skb, const struct pkt *p)
{
	struct bpf_sock *sk = skb->sk;

	return sk && sk->src_ip4 == p->t.saddr && sk->src_port == bpf_ntohs(p->t.sport) &&
	       sk->dst_ip4 == p->t.daddr && sk->dst_port == p->t.dport;
}

/* Does a live SNAT'd flow hold the port of this packet (the node's, leaving) towards its destination? */
static __always_inline int hostnat_clash(const struct pkt *p, const struct lb_config *cfg, __u64 now)
{
	struct ct_tuple rkey;
	struct ct_entry *held;

	ct_reply_tuple(&rkey, p->t.daddr, p->t.dport, p->t.saddr, p->t.sport, p->t.proto);
	held = bpf_map_lookup_elem(&ct_rev, &rkey);
	if (!held || !(held->flags & CT_F_SNAT))
		return 0;
	return ct_alive(held, p->t.proto, cfg, now) || !ct_peer_gone(held, CT_DIR_REV, p->t.proto, cfg, now);
}

/* tc egress: a packet the node's own stack sends from its SNAT address and a port of the range.
 * Returns a verdict, or -1 when it is not a moved connection (the packet goes on untouched). */
static __always_inline int hostnat_egress(struct __sk_buff *skb, struct pkt *p, const struct lb_config *cfg)
{
	struct ct_entry *e, fresh = {}, rev;
	__u16 sport = bpf_ntohs(p->t.sport);
	struct ct_tuple rkey;
	__u64 now;

	if (p->t.saddr != cfg->snat_addr || sport < cfg->nat_port_min || sport > cfg->nat_port_max ||
	    !hostnat_own(skb, p))
		return -1;
	now = bpf_ktime_get_ns();
	e = bpf_map_lookup_elem(&ct_fwd, &p->t);
	if (!(e && (e->flags & CT_F_HOST) && ct_usable(e, p, cfg, now))) {
		/* Only a connection's first packet can be moved: a TCP SYN, or a UDP datagram. */
		if (p->t.proto == IPPROTO_TCP && (p->tcp_flags & (TCPF_SYN | TCPF_ACK)) != TCPF_SYN)
			return -1;
		if (!hostnat_clash(p, cfg, now))
			return -1;
		fresh.last_seen = now;
		fresh.client_addr = p->t.saddr;
		fresh.client_port = p->t.sport;
		fresh.fe_addr = fresh.backend_addr = p->t.daddr;
		fresh.fe_port = fresh.backend_port = p->t.dport;
		fresh.nat_addr = cfg->snat_addr;
		fresh.flags = CT_F_SNAT | CT_F_HOST;
		fresh.mode = LB_MODE_SNAT;
		rev = fresh;
		if (natpool_alloc(skb, cfg, &rev, p->t.proto)) {
			stat_inc(STAT_DROP_HOST_NAT_EXHAUSTED);
			return TC_ACT_SHOT;      /* the stack retransmits; the held flow keeps its replies */
		}
		fresh.nat_port = rev.nat_port;
		if (bpf_map_update_elem(&ct_fwd, &p->t, &fresh, BPF_ANY) < 0) {
			ct_reply_tuple(&rkey, p->t.daddr, p->t.dport, cfg->snat_addr, rev.nat_port, p->t.proto);
			bpf_map_delete_elem(&ct_rev, &rkey);
			stat_inc(STAT_CT_INSERT_FAILED);
			return TC_ACT_SHOT;
		}
		stat_inc(STAT_HOST_NAT);
		e = bpf_map_lookup_elem(&ct_fwd, &p->t);
		if (!e)
			return TC_ACT_SHOT;
	} else {
		ct_account(e, p, CT_DIR_FWD, now);
	}
	if (nat_rewrite(skb, p, e->nat_addr, e->nat_port, p->t.daddr, p->t.dport) < 0) {
		stat_inc(STAT_DROP_ERROR);
		return TC_ACT_SHOT;
	}
	return TC_ACT_OK;
}

#endif
