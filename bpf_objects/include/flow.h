/* Creating a flow: the decision a new connection gets (local DNAT, DSR, or SNAT with a port from the
 * pool) and the conntrack entries that carry it, shared by the tc and XDP programs. */
#ifndef BPFLB_FLOW_H
#define BPFLB_FLOW_H

#include "common.h"
#include "maps.h"
#include "parse.h"
#include "conntrack.h"
#include "natpool.h"
#include "dsr.h"

/* Why a new flow was not created; tc answers the sender (reset.h), XDP hands the packet on to tc. */
#define NP_NEW_NO_PORT 1       /* no SNAT port free for the backend tuple */
#define NP_NEW_CT_FULL 2       /* a conntrack map is full */
#define NP_NEW_ERROR 3

/* The client's tuple had an entry that can no longer carry it (closed, dead, or its backend gone):
 * that flow is over, so its reverse entry (and SNAT port) only waits out the closing time. */
static __always_inline void np_retire(const struct ct_entry *old, __u8 proto, __u64 now)
{
	struct ct_entry *peer = ct_peer(old, CT_DIR_FWD, proto);

	if (peer && !(peer->flags & CT_F_CLOSING)) {
		peer->flags |= CT_F_CLOSING;
		peer->last_seen = now;
	}
}

/* Create a new flow's conntrack entries for a freshly selected backend (tc and XDP alike): local
 * backends by DNAT, remote ones by DSR or SNAT as the node's mode says for this protocol.  old: the
 * client tuple's unusable entry, if any.  ctx: the program's context (socket lookups).  On success the
 * flow is in *e (it may be another CPU's, created for the same tuple a moment earlier) and 0 is
 * returned, else NP_NEW_*. */
static __always_inline int np_new_flow(void *ctx, struct pkt *p, const struct lb_config *cfg,
				       const struct lb_svc_val *svc, __u32 be_id, const struct lb_backend *be,
				       struct ct_entry *e, struct ct_entry *old, __u64 now)
{
	struct ct_entry rev = {}, *won;
	struct ct_tuple rkey;
	int rc, own_rev = 0;   /* a reverse entry this call wrote, undone if the forward one fails */

	e->last_seen = now;
	e->backend_id = be_id;
	e->backend_addr = be->addr;
	e->backend_port = be->port;
	e->fe_addr = p->t.daddr;
	e->fe_port = p->t.dport;
	e->client_addr = p->t.saddr;
	e->client_port = p->t.sport;
	e->svc_id = svc->id;
	e->mode = cfg->mode;
	if (be->flags & LB_BE_F_LOCAL)
		e->flags = CT_F_LOCAL;        /* DNAT only: the pod sees the client; its reply leaves via egress */
	else if (dsr_mode_applies(cfg->mode, p->t.proto))
		e->flags = CT_F_DSR;          /* the backend's node keeps the reply state, not this one */
	else
		e->flags = CT_F_SNAT;         /* the source becomes this node, with a port of the pool */
	ct_track(e, p, CT_DIR_FWD, now);      /* what the first packet already says (FIN, RST, a DSR ACK) */
	if (old)
		np_retire(old, p->t.proto, now);   /* before a local flow's reverse key is reused below */

	if (e->flags & CT_F_LOCAL) {
		rev = *e;
		ct_reply_tuple(&rkey, be->addr, be->port, p->t.saddr, p->t.sport, p->t.proto);
		rc = ct_rev_held(&rkey, &rev, p->t.proto, cfg, now) ? ct_portmap(cfg, e, &rkey) : -1;
		if (rc == 0)
			own_rev = 1;
		else if (rc != -1 || ct_record_rev(&rkey, &rev, p, cfg, now) < 0)
			return NP_NEW_CT_FULL;
	} else if (e->flags & CT_F_SNAT) {
		e->nat_addr = cfg->snat_addr;
		rev = *e;
		rc = natpool_alloc(ctx, cfg, &rev, p->t.proto);
		if (rc)
			return rc == -ERR_ENOSPC ? NP_NEW_NO_PORT : NP_NEW_CT_FULL;
		e->nat_port = rev.nat_port;
		ct_reply_tuple(&rkey, be->addr, be->port, cfg->snat_addr, rev.nat_port, p->t.proto);
		own_rev = 1;
	}
	if (old) {
		rc = bpf_map_update_elem(&ct_fwd, &p->t, e, BPF_ANY);
	} else {
		rc = bpf_map_update_elem(&ct_fwd, &p->t, e, BPF_NOEXIST);
		if (rc == -ERR_EEXIST) {
			/* Another CPU created this tuple's flow meanwhile (a retransmission): use that one. */
			if (own_rev)
				bpf_map_delete_elem(&ct_rev, &rkey);
			won = bpf_map_lookup_elem(&ct_fwd, &p->t);
			if (!won)
				return NP_NEW_ERROR;
			*e = *won;
			return 0;
		}
	}
	if (rc < 0) {
		if (own_rev)
			bpf_map_delete_elem(&ct_rev, &rkey);
		return NP_NEW_CT_FULL;
	}
	return 0;
}

#endif
