/* Creating a flow: the decision a new connection gets (local DNAT, DSR, or SNAT with an allocated
 * port) and the conntrack entries that carry it, shared by the tc and XDP programs. */
#ifndef BPFLB_FLOW_H
#define BPFLB_FLOW_H

#include "common.h"
#include "maps.h"
#include "parse.h"
#include "conntrack.h"
#include "dsr.h"

/* Create a new flow's conntrack entries for a freshly selected backend (tc and XDP alike):
 * local backends by DNAT, remote ones by DSR or SNAT as the node's mode says for this protocol.
 * 0 on success, else a verdict (TC_ACT_SHOT; XDP maps it to XDP_DROP). */
static __always_inline int np_new_flow(struct pkt *p, const struct lb_config *cfg, const struct lb_svc_val *svc,
				       __u32 be_id, const struct lb_backend *be, struct ct_entry *e, __u64 now)
{
	struct ct_entry rev = {};
	struct ct_tuple rkey;
	__u32 span = (__u32)cfg->nat_port_max - cfg->nat_port_min + 1;
	int i;

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

	rev = *e;
	if (be->flags & LB_BE_F_LOCAL) {
		/* Local backend: DNAT only, the pod sees the client; its reply leaves via egress. */
		e->flags = CT_F_LOCAL;
		rev.flags = CT_F_LOCAL;
		ct_reply_tuple(&rkey, be->addr, be->port, p->t.saddr, p->t.sport, p->t.proto);
		if (bpf_map_update_elem(&ct_rev, &rkey, &rev, BPF_ANY) < 0)
			return TC_ACT_SHOT;
	} else if (dsr_mode_applies(cfg->mode, p->t.proto)) {
		/* Remote backend by DSR: the backend's node keeps the reply state, not this one. */
		e->flags = CT_F_DSR;
	} else {
		/* Remote backend in SNAT mode: source becomes this node with a free port. */
		e->flags = CT_F_SNAT;
		rev.flags = CT_F_SNAT;
		e->nat_addr = cfg->snat_addr;
		rev.nat_addr = cfg->snat_addr;
		if (span == 0 || span > 65536)
			return TC_ACT_SHOT;
		for (i = 0; i < NAT_PORT_TRIES; i++) {
			__be16 port = bpf_htons((__u16)(cfg->nat_port_min + bpf_get_prandom_u32() % span));
			struct ct_entry *old;

			ct_reply_tuple(&rkey, be->addr, be->port, cfg->snat_addr, port, p->t.proto);
			rev.nat_port = port;
			if (bpf_map_update_elem(&ct_rev, &rkey, &rev, BPF_NOEXIST) == 0)
				break;
			/* Taken: by a live flow, or by one that ended (closed or idle past its lifetime),
			 * whose port is free again. */
			old = bpf_map_lookup_elem(&ct_rev, &rkey);
			if (old && now - old->last_seen > ct_lifetime(old, p->t.proto, cfg) &&
			    bpf_map_update_elem(&ct_rev, &rkey, &rev, BPF_EXIST) == 0)
				break;
		}
		if (i < NAT_PORT_TRIES)
			e->nat_port = rev.nat_port;
		if (i == NAT_PORT_TRIES) {
			stat_inc(STAT_DROP_NAT_EXHAUSTED);
			return TC_ACT_SHOT;
		}
	}
	if (p->tcp_flags & (TCPF_FIN | TCPF_RST))
		e->flags |= CT_F_CLOSING;
	if (bpf_map_update_elem(&ct_fwd, &p->t, e, BPF_ANY) < 0)
		return TC_ACT_SHOT;
	return 0;
}

#endif
