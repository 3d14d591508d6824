/* Connection tracking: a flow's forward and reverse entries, their lifetimes, their refresh. */
#ifndef BPFLB_CONNTRACK_H
#define BPFLB_CONNTRACK_H

#include "common.h"
#include "maps.h"
#include "parse.h"

#define CT_REFRESH_NS NSEC_PER_SEC   /* write last_seen at most once a second per entry */
#define CT_RESET_LIFETIME_NS NSEC_PER_SEC   /* an RST-closed flow: a second for packets in flight */

/* Lifetime of an entry in nanoseconds, by protocol and state. */
static __always_inline __u64 ct_lifetime(const struct ct_entry *e, __u8 proto, const struct lb_config *cfg)
{
	if (e->flags & CT_F_RESET)
		return CT_RESET_LIFETIME_NS;
	if (e->flags & CT_F_CLOSING)
		return (__u64)cfg->closing_timeout * NSEC_PER_SEC;
	if (proto == IPPROTO_TCP)
		return (__u64)cfg->tcp_timeout * NSEC_PER_SEC;
	return (__u64)cfg->udp_timeout * NSEC_PER_SEC;
}

/* True when the entry may carry this packet: not expired, and not a closed flow seeing a new SYN. */
static __always_inline int ct_usable(const struct ct_entry *e, const struct pkt *p, const struct lb_config *cfg,
				     __u64 now)
{
	if (now - e->last_seen > ct_lifetime(e, p->t.proto, cfg))
		return 0;
	if ((e->flags & CT_F_CLOSING) && (p->tcp_flags & (TCPF_SYN | TCPF_ACK)) == TCPF_SYN)
		return 0;
	return 1;
}

/* The end of a flow, seen in one direction: mark the entry closing (FIN) or reset (RST). */
static __always_inline void ct_close(struct ct_entry *e, __u8 tcp_flags, __u64 now)
{
	e->flags |= CT_F_CLOSING | ((tcp_flags & TCPF_RST) ? CT_F_RESET : 0);
	e->last_seen = now;
}

/* Record that a packet used the entry: refresh its timestamp, note FIN/RST.  True when the packet
 * ended the flow, so the caller closes the other direction's entry too (ct_close_peer). */
static __always_inline int ct_touch(struct ct_entry *e, const struct pkt *p, __u64 now)
{
	if (p->tcp_flags & (TCPF_FIN | TCPF_RST)) {
		ct_close(e, p->tcp_flags, now);
		return 1;
	}
	if (now - e->last_seen > CT_REFRESH_NS)
		e->last_seen = now;
	return 0;
}

/* The reverse-direction key of a flow whose reply travels backend -> (nat or client). */
static __always_inline void ct_reply_tuple(struct ct_tuple *r, __be32 be_addr, __be16 be_port,
					   __be32 peer_addr, __be16 peer_port, __u8 proto)
{
	r->saddr = be_addr;
	r->daddr = peer_addr;
	r->sport = be_port;
	r->dport = peer_port;
	r->proto = proto;
	r->pad[0] = r->pad[1] = r->pad[2] = 0;
}

/* The reverse entry of a flow this node SNAT'd, when the packet is its reply (addressed to this
 * node's SNAT address, in the NAT port range); NULL otherwise. */
static __always_inline struct ct_entry *ct_snat_reply(const struct pkt *p, const struct lb_config *cfg)
{
	__u16 dport = bpf_ntohs(p->t.dport);
	struct ct_entry *rev;

	if (p->t.daddr != cfg->snat_addr || dport < cfg->nat_port_min || dport > cfg->nat_port_max)
		return NULL;
	rev = bpf_map_lookup_elem(&ct_rev, &p->t);
	return rev && (rev->flags & CT_F_SNAT) ? rev : NULL;
}

/* A flow ended in the direction of entry e (forward: is_fwd): close the other direction's entry
 * as well, so an SNAT port is free again once the flow is over, whichever side ended it. */
static __always_inline void ct_close_peer(const struct ct_entry *e, int is_fwd, __u8 proto, __u8 tcp_flags,
					  __u64 now)
{
	struct ct_tuple key;
	struct ct_entry *peer;

	if (is_fwd) {
		if (e->flags & CT_F_SNAT)
			ct_reply_tuple(&key, e->backend_addr, e->backend_port, e->nat_addr, e->nat_port, proto);
		else if (e->flags & CT_F_LOCAL)
			ct_reply_tuple(&key, e->backend_addr, e->backend_port, e->client_addr, e->client_port, proto);
		else
			return;   /* DSR: the reply state lives on the backend's node */
		peer = bpf_map_lookup_elem(&ct_rev, &key);
	} else {
		ct_reply_tuple(&key, e->client_addr, e->client_port, e->fe_addr, e->fe_port, proto);
		peer = bpf_map_lookup_elem(&ct_fwd, &key);
	}
	if (peer)
		ct_close(peer, tcp_flags, now);
}

#endif
