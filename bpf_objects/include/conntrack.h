/* Connection tracking: a flow's forward and reverse entries, their lifetimes, their refresh. */
#ifndef BPFLB_CONNTRACK_H
#define BPFLB_CONNTRACK_H

#include "common.h"
#include "maps.h"
#include "parse.h"

#define CT_REFRESH_NS NSEC_PER_SEC   /* write last_seen at most once a second per entry */

/* Lifetime of an entry in nanoseconds, by protocol and state. */
static __always_inline __u64 ct_lifetime(const struct ct_entry *e, __u8 proto, const struct lb_config *cfg)
{
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

/* Record that a packet used the entry: refresh its timestamp, note FIN/RST. */
static __always_inline void ct_touch(struct ct_entry *e, const struct pkt *p, __u64 now)
{
	if (p->tcp_flags & (TCPF_FIN | TCPF_RST)) {
		if (!(e->flags & CT_F_CLOSING))
			e->flags |= CT_F_CLOSING;
		e->last_seen = now;
	} else if (now - e->last_seen > CT_REFRESH_NS) {
		e->last_seen = now;
	}
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

#endif
