/* Direct pod traffic: TCP flows of a Service's backend pod that the load balancer did not make.
 *
 * A backend pod's untranslated replies to outside the cluster are dropped (dsr.h, dsr_untracked_reply):
 * a DSR flow whose state this node lost would otherwise answer with the pod's own address.  But clients
 * also reach pods at their own addresses (cloud load balancers in IP-target mode, routed pod CIDRs), and
 * pods open connections from a Service's port; those replies must leave.  The node tells them apart by
 * how the flow started: a SYN without a DSR option arriving for a local backend endpoint, or a SYN the
 * pod sends itself, starts a direct flow, remembered here by the tuple the pod's packets leave with.  A
 * DSR flow starts with the option on its SYN (retransmissions included), so no DSR flow is ever taken
 * for a direct one, and a flow seen neither way (lost state) stays dropped.  UDP is never dropped (a DSR
 * datagram carries its option every time, so its state is never lost). */
#ifndef BPFLB_DIRECT_H
#define BPFLB_DIRECT_H

#include "common.h"
#include "maps.h"
#include "parse.h"
#include "conntrack.h"
#include "dsr.h"

/* Direct flows by the tuple of the pod's packets (pod -> peer).  LRU, LB_DIRECT_MAX entries: a flow
 * pushed out loses its replies (counted as drop_dsr_no_state) until its peer opens a new one. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ct_tuple);
	__type(value, struct lb_direct_flow);
	__uint(max_entries, LB_DIRECT_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_direct SEC(".maps");

static __always_inline int tcp_pure_syn(const struct pkt *p)
{
	return p->t.proto == IPPROTO_TCP && (p->tcp_flags & (TCPF_SYN | TCPF_ACK)) == TCPF_SYN;
}

static __always_inline void direct_record(const struct ct_tuple *key, __u64 now)
{
	struct lb_direct_flow flow = { .last_seen = now };

	if (bpf_map_update_elem(&lb_direct, key, &flow, BPF_ANY) == 0)
		stat_inc(STAT_DIRECT_FLOW);
}

/* Ingress, a packet that is no Service's: a SYN (without DSR option: that one was taken by dsr.h) from
 * outside the cluster to one of this node's backend endpoints opens a direct flow.  Senders inside the
 * cluster (another node SNAT'ing to this pod, a pod) need no entry: replies to them are never dropped. */
static __always_inline void direct_ingress(const struct pkt *p)
{
	struct lb_l4_key be = { .addr = p->t.daddr, .port = p->t.dport, .proto = IPPROTO_TCP };
	struct lb_cidr_key src = { .prefixlen = 32, .addr = p->t.saddr };
	struct ct_tuple key;

	if (!tcp_pure_syn(p) || !bpf_map_lookup_elem(&lb_local_backends, &be) ||
	    bpf_map_lookup_elem(&lb_cluster_cidrs, &src))
		return;
	ct_reply_tuple(&key, p->t.daddr, p->t.dport, p->t.saddr, p->t.sport, IPPROTO_TCP);
	direct_record(&key, bpf_ktime_get_ns());
}

/* Egress, an untracked packet of a backend endpoint to outside the cluster (dsr_untracked_reply): true
 * when it belongs to a direct flow (and may leave untranslated).  A SYN the pod sends opens one. */
static __always_inline int direct_egress(const struct pkt *p, const struct lb_config *cfg, __u64 now)
{
	struct lb_direct_flow *flow;
	__u64 life;

	if (tcp_pure_syn(p)) {
		direct_record(&p->t, now);
		return 1;
	}
	flow = bpf_map_lookup_elem(&lb_direct, &p->t);
	if (!flow)
		return 0;
	life = (__u64)(flow->closing ? cfg->closing_timeout : cfg->tcp_timeout) * NSEC_PER_SEC;
	if (now - flow->last_seen > life)
		return 0;
	if (p->tcp_flags & (TCPF_FIN | TCPF_RST)) {
		flow->closing = 1;
		flow->last_seen = now;
	} else if (now - flow->last_seen > CT_REFRESH_NS) {
		flow->last_seen = now;
	}
	return 1;
}

#endif
