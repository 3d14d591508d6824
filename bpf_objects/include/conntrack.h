/* Connection tracking: a flow's forward and reverse entries, their lifetimes (those of nf_conntrack and
 * Cilium), what the packets of both directions tell about a TCP flow's life, and how an entry keeps the
 * other entry of its flow in step (refresh, handshake, FIN, RST). */
#ifndef BPFLB_CONNTRACK_H
#define BPFLB_CONNTRACK_H

#include "common.h"
#include "maps.h"
#include "parse.h"

#define CT_REFRESH_NS NSEC_PER_SEC   /* write last_seen at most once a second per entry */
#define CT_RESET_LIFETIME_NS NSEC_PER_SEC   /* an RST-closed flow: a second for packets in flight */

/* Which entry a packet used: the forward one (client -> backend) or the reverse one (the reply). */
#define CT_DIR_FWD 0
#define CT_DIR_REV 1

/* Lifetime of an entry in nanoseconds, by protocol and state.  A TCP flow whose handshake never
 * completed lives syn_timeout from its creation (ct_track does not refresh it), so a spoofed SYN holds
 * its state and its SNAT port at most that long, however often the backend retransmits its SYN-ACK. */
static __always_inline __u64 ct_lifetime(const struct ct_entry *e, __u8 proto, const struct lb_config *cfg)
{
	if (e->flags & CT_F_RESET)
		return CT_RESET_LIFETIME_NS;
	if (e->flags & CT_F_CLOSING)
		return (__u64)cfg->closing_timeout * NSEC_PER_SEC;
	if (proto == IPPROTO_TCP)
		return (__u64)((e->state & CT_S_ESTABLISHED) ? cfg->tcp_timeout : cfg->syn_timeout) * NSEC_PER_SEC;
	return (__u64)cfg->udp_timeout * NSEC_PER_SEC;
}

/* True while the entry is alive.  last_seen may be a hair ahead of now (another CPU read the clock
 * later and wrote first): that entry is alive, not 584 years old. */
static __always_inline int ct_alive(const struct ct_entry *e, __u8 proto, const struct lb_config *cfg, __u64 now)
{
	__u64 seen = e->last_seen;

	return seen >= now || now - seen <= ct_lifetime(e, proto, cfg);
}

/* True when the entry may carry this packet: alive, and not a closed flow seeing a new SYN (the client
 * reopened its tuple: a new flow, as nf_conntrack does from TIME_WAIT).  A flow whose client already sent
 * its FIN counts as closed for this: the socket that sent it sends no SYN on the connection any more (as
 * Cilium reopens an entry closing in either direction).  That matters where only the client's side is
 * seen: a DSR flow's balancing node never learns of the backend's FIN, and would otherwise carry the
 * client's next connection on that tuple in the old flow's mode and to its backend. */
static __always_inline int ct_usable(const struct ct_entry *e, const struct pkt *p, const struct lb_config *cfg,
				     __u64 now)
{
	if (!ct_alive(e, p->t.proto, cfg, now))
		return 0;
	if (((e->flags & CT_F_CLOSING) || (e->state & CT_S_FIN_FWD)) &&
	    (p->tcp_flags & (TCPF_SYN | TCPF_ACK)) == TCPF_SYN)
		return 0;
	return 1;
}

/* Does this segment complete the handshake?  As nf_conntrack sees it: the client's ACK of the backend's
 * SYN-ACK (its acknowledgment number checked: a spoofed source never saw that SYN-ACK), or any non-SYN
 * segment from the backend's side (its socket sends one only once established).  The balancing node of a
 * DSR flow never sees the backend's side and takes the client's first ACK (as Cilium does). */
static __always_inline int ct_establishes(const struct ct_entry *e, const struct pkt *p, int dir)
{
	if ((p->tcp_flags & (TCPF_SYN | TCPF_RST | TCPF_ACK)) != TCPF_ACK)
		return 0;
	if (dir == CT_DIR_REV)
		return 1;
	if (e->flags & CT_F_DSR)
		return 1;
	return (e->state & CT_S_SYN_ACK) && p->ack == e->syn_ack_seq + 1;
}

/* Record that a packet used the entry in direction dir.  TCP: RST resets the flow; a FIN marks its
 * side, and the flow is closing once both sides sent one (a half-closed connection keeps its state);
 * the backend's SYN-ACK is noted, and the handshake's completion makes the flow established.  The
 * timestamp is refreshed at most once a second, except while the handshake is incomplete (that
 * lifetime counts from the flow's creation).  Returns 1 when the flow's other entry must learn of it
 * (ct_sync_peer). */
static __always_inline int ct_track(struct ct_entry *e, const struct pkt *p, int dir, __u64 now)
{
	int sync = 0;

	if (p->t.proto == IPPROTO_TCP) {
		if (p->tcp_flags & TCPF_RST) {
			if (!(e->flags & CT_F_RESET)) {
				e->flags |= CT_F_CLOSING | CT_F_RESET;
				e->last_seen = now;
				return 1;
			}
		} else {
			if (p->tcp_flags & TCPF_FIN) {
				__u8 side = dir == CT_DIR_FWD ? CT_S_FIN_FWD : CT_S_FIN_REV;

				if (!(e->state & side)) {
					e->state |= side;
					if ((e->state & (CT_S_FIN_FWD | CT_S_FIN_REV)) == (CT_S_FIN_FWD | CT_S_FIN_REV)) {
						e->flags |= CT_F_CLOSING;
						e->last_seen = now;
					}
					sync = 1;
				}
			}
			if (!(e->state & CT_S_ESTABLISHED)) {
				if (dir == CT_DIR_REV && (p->tcp_flags & (TCPF_SYN | TCPF_ACK)) == (TCPF_SYN | TCPF_ACK)) {
					e->state |= CT_S_SYN_ACK;
					e->syn_ack_seq = p->seq;
					return 1;
				}
				if (ct_establishes(e, p, dir)) {
					e->state |= CT_S_ESTABLISHED;
					e->last_seen = now;
					return 1;
				}
			}
		}
		if (!(e->state & CT_S_ESTABLISHED) && !(e->flags & CT_F_CLOSING))
			return sync;
	}
	if (now > e->last_seen + CT_REFRESH_NS) {
		e->last_seen = now;
		sync = 1;
	}
	return sync;
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

/* The key of the flow's other entry on this node; 0 when it has none here (DSR: the reverse state of
 * a DSR flow lives on the backend's node, its forward state on the balancing node; but a DSR flow the
 * backend's node gave another client port has its mapping there, dsr.h's dsr_portmap). */
static __always_inline int ct_peer_key(const struct ct_entry *e, int dir, __u8 proto, struct ct_tuple *key)
{
	if ((e->flags & (CT_F_DSR | CT_F_PORTMAP)) == CT_F_DSR)
		return 0;
	if (dir == CT_DIR_FWD) {
		if (e->flags & (CT_F_SNAT | CT_F_PORTMAP))
			ct_reply_tuple(key, e->backend_addr, e->backend_port, e->nat_addr, e->nat_port, proto);
		else
			ct_reply_tuple(key, e->backend_addr, e->backend_port, e->client_addr, e->client_port, proto);
	} else if (e->flags & CT_F_DSR) {
		/* a remapped DSR flow's mapping, keyed by its requests as they arrive (client -> pod) */
		ct_reply_tuple(key, e->client_addr, e->client_port, e->backend_addr, e->backend_port, proto);
	} else {
		ct_reply_tuple(key, e->client_addr, e->client_port, e->fe_addr, e->fe_port, proto);
	}
	return 1;
}

/* Do two entries belong to the same flow?  A client's forward entry can already belong to a newer
 * flow of the same tuple (a reopened connection) while the old flow's reverse entry runs out. */
static __always_inline int ct_same_flow(const struct ct_entry *a, const struct ct_entry *b)
{
	return a->backend_addr == b->backend_addr && a->backend_port == b->backend_port &&
	       a->nat_addr == b->nat_addr && a->nat_port == b->nat_port &&
	       a->client_addr == b->client_addr && a->client_port == b->client_port;
}

/* The flow's other entry, or NULL (none on this node, gone, or belonging to a newer flow). */
static __always_inline struct ct_entry *ct_peer(const struct ct_entry *e, int dir, __u8 proto)
{
	struct ct_tuple key;
	struct ct_entry *peer;

	if (!ct_peer_key(e, dir, proto, &key))
		return NULL;
	peer = bpf_map_lookup_elem(dir == CT_DIR_FWD ? (void *)&ct_rev : (void *)&ct_fwd, &key);
	return peer && ct_same_flow(e, peer) ? peer : NULL;
}

/* Bring the flow's other entry in step with e: both entries live and die together, so the reverse
 * entry of a flow that only the client keeps busy stays alive (and its SNAT port taken) as long as the
 * forward one, and the other way round.  What they record only ever grows, so merging is exact. */
static __always_inline void ct_sync_peer(const struct ct_entry *e, int dir, __u8 proto)
{
	struct ct_entry *peer = ct_peer(e, dir, proto);

	if (!peer)
		return;
	if ((e->state & CT_S_SYN_ACK) && !(peer->state & CT_S_ESTABLISHED))
		peer->syn_ack_seq = e->syn_ack_seq;
	peer->state |= e->state;
	peer->flags |= e->flags & (CT_F_CLOSING | CT_F_RESET);
	if (e->last_seen > peer->last_seen)
		peer->last_seen = e->last_seen;
}

/* A packet used entry e in direction dir: track it, and tell the other entry when that matters. */
static __always_inline void ct_account(struct ct_entry *e, const struct pkt *p, int dir, __u64 now)
{
	if (ct_track(e, p, dir, now))
		ct_sync_peer(e, dir, p->t.proto);
}

/* True when no live entry of e's flow holds on to it from the other side: e's peer is gone, belongs to
 * another flow, or has run out. */
static __always_inline int ct_peer_gone(const struct ct_entry *e, int dir, __u8 proto, const struct lb_config *cfg,
					__u64 now)
{
	struct ct_entry *peer = ct_peer(e, dir, proto);

	return !peer || !ct_alive(peer, proto, cfg, now);
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

/* Record the reverse entry a packet of a new flow needs at key (local backends: DNAT only; DSR: on the
 * backend's node) without ever overwriting a live flow's entry.  The same flow's entry (a retransmitted
 * SYN, a DSR UDP flow's next datagram) is kept and tracked as a forward packet; a live entry of another
 * flow of that tuple is left alone (returns 1); a closed or dead flow's entry is replaced.
 * 0 when recorded or kept, 1 when another live flow holds the key, <0 when the map refused it (full). */
static __always_inline int ct_record_rev(const struct ct_tuple *key, const struct ct_entry *rev, const struct pkt *p,
					 const struct lb_config *cfg, __u64 now)
{
	struct ct_entry *old;
	int rc = bpf_map_update_elem(&ct_rev, key, rev, BPF_NOEXIST);

	if (rc != -17)   /* -EEXIST */
		return rc;
	old = bpf_map_lookup_elem(&ct_rev, key);
	if (old && ct_usable(old, p, cfg, now)) {
		if ((old->flags ^ rev->flags) & (CT_F_SNAT | CT_F_LOCAL | CT_F_DSR) || old->fe_addr != rev->fe_addr || old->fe_port != rev->fe_port ||
		    old->backend_addr != rev->backend_addr || old->backend_port != rev->backend_port)
			return 1;
		ct_track(old, p, CT_DIR_FWD, now);
		return 0;
	}
	return bpf_map_update_elem(&ct_rev, key, rev, BPF_ANY);
}

/* Linux keeps a closed TCP connection's tuple in TIME_WAIT this long (TCP_TIMEWAIT_LEN). */
#define CT_TIME_WAIT_NS (60ULL * NSEC_PER_SEC)

/* Does another flow still hold key, the reverse key a new flow to a local backend would take (the pod
 * sees the client's own tuple)?  Held: an entry of a different flow (another frontend, another kind)
 * that is alive, or that closed by FIN less than TIME_WAIT ago while the map still has it: the pod's
 * socket may still be in TIME_WAIT, and a SYN on that tuple from a new flow (whose client picked its
 * sequence number and timestamps for another destination) is answered with the old connection's ACK,
 * costing the client a SYN retransmission (a second).  Not held: a flow closed by RST (no socket, no
 * TIME_WAIT), and the same frontend's flow (the client reopening its own tuple, which TIME_WAIT accepts
 * and ct_record_rev replaces). */
static __always_inline int ct_rev_held(const struct ct_tuple *key, const struct ct_entry *rev, __u8 proto,
				       const struct lb_config *cfg, __u64 now)
{
	struct ct_entry *old = bpf_map_lookup_elem(&ct_rev, key);
	__u64 seen;

	if (!old || (old->flags & CT_F_RESET))   /* a RST left no socket on the tuple, no TIME_WAIT */
		return 0;
	if (!((old->flags ^ rev->flags) & (CT_F_SNAT | CT_F_LOCAL | CT_F_DSR)) && old->fe_addr == rev->fe_addr &&
	    old->fe_port == rev->fe_port && old->backend_addr == rev->backend_addr &&
	    old->backend_port == rev->backend_port)
		return 0;
	if (ct_alive(old, proto, cfg, now))
		return 1;
	seen = old->last_seen;
	return proto == IPPROTO_TCP && (old->flags & CT_F_CLOSING) && now - seen <= CT_TIME_WAIT_NS;
}

#define CT_PORTMAP_TRIES 4

/* A new flow to a pod of this node whose reverse key another flow holds (ct_rev_held): give it another
 * client port, as nf_nat does on a tuple clash, so the pod sees a tuple of its own (the client's address
 * stays).  A random port of the node's NAT range whose reverse key is free: rkey becomes that key, e
 * records the port (CT_F_PORTMAP, nat_addr:nat_port) and its reverse entry is written.  0 when recorded,
 * -1 when no free port was found (e and rkey unchanged), another negative value when the map refused. */
static __always_inline int ct_portmap(const struct lb_config *cfg, struct ct_entry *e, struct ct_tuple *rkey)
{
	__u32 span = cfg->nat_port_max >= cfg->nat_port_min ? cfg->nat_port_max - cfg->nat_port_min + 1 : 1;
	struct ct_entry rev;
	int i, rc;

	for (i = 0; i < CT_PORTMAP_TRIES; i++) {
		rkey->dport = bpf_htons((__u16)(cfg->nat_port_min + bpf_get_prandom_u32() % span));
		if (rkey->dport == e->client_port)
			continue;
		rev = *e;
		rev.flags |= CT_F_PORTMAP;
		rev.nat_addr = e->client_addr;
		rev.nat_port = rkey->dport;
		rc = bpf_map_update_elem(&ct_rev, rkey, &rev, BPF_NOEXIST);
		if (rc == 0) {
			*e = rev;
			stat_inc(STAT_CT_PORT_REMAPPED);
			return 0;
		}
		if (rc != -17)   /* -EEXIST: taken, try another */
			return rc;
	}
	rkey->dport = e->client_port;
	return -1;
}

/* ct_record_rev for the backend's node of a DSR flow (dsr.h): counted; <0 only when the map is full. */
static __always_inline int ct_record_dsr_rev(const struct ct_tuple *key, const struct ct_entry *rev,
					     const struct pkt *p, __u64 now)
{
	struct lb_config *cfg = config_get();
	int rc;

	if (!cfg)
		return -1;
	rc = ct_record_rev(key, rev, p, cfg, now);
	if (rc < 0)
		stat_inc(STAT_CT_INSERT_FAILED);
	else if (rc > 0)
		stat_inc(STAT_DSR_STATE_KEPT);
	return rc;
}

#endif
