/* The pod-facing tc path: in-cluster traffic the socket hooks did not translate (a pod whose processes
 * are outside the socket LB's cgroup), seen on the host side of every pod's veth.
 *
 * From the pod (tc ingress): a packet to a frontend is DNAT'd to a backend chosen from the frontend's
 * internal view (east_west.h; lb.h's selection on the real flow: Maglev, affinity by the pod's address)
 * and handed to the kernel, which routes it to a pod of this node or across the underlay or overlay,
 * as any pod-to-pod packet.  The source stays the pod: every reply is addressed to it and so passes
 * its veth on the way in, local backend (bridged straight to it) or remote, where it is shown from the
 * frontend again (tc egress).  No SNAT, no port allocation.
 * Hairpin: a pod that gets itself as backend would see its own address as the source and answer to
 * itself inside its namespace; its flow gets LB_HAIRPIN_ADDR as source instead, and the pod's answer,
 * routed to its gateway, is caught on the way out and sent straight back in, translated.
 * A frontend without endpoints answers ICMP port unreachable (kube-proxy's REJECT); with endpoints
 * but none on this node under internalTrafficPolicy Local, the packet is dropped (kube-proxy's DROP).
 * Flows live in ct_fwd/ct_rev like external ones: CT_F_LOCAL (DNAT only) or, for hairpin, CT_F_SNAT
 * with nat_addr LB_HAIRPIN_ADDR and the pod's own port, so conntrack.h closes both directions.
 * Only sources inside this node's pod CIDRs are served: a pod claiming any other address (another
 * node's pod, a node, an outside host) would have a backend answer someone else; it is dropped. */
#ifndef BPFLB_POD_H
#define BPFLB_POD_H

#include "common.h"
#include "maps.h"
#include "parse.h"
#include "nat.h"
#include "frag.h"
#include "conntrack.h"
#include "lb.h"
#include "icmp.h"
#include "east_west.h"

/* This node's pod CIDRs (the agent writes them from its Node object; 0.0.0.0/0 when it has none): the
 * sources a pod's packet to a Service may have. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct lb_cidr_key);
	__type(value, __u8);
	__uint(max_entries, LB_POD_CIDRS_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_pod_cidrs SEC(".maps");

/* Back into the pod the packet came from: MACs swapped, out of the veth's host side. */
static __always_inline int pod_return(struct __sk_buff *skb)
{
	struct ethhdr eth;
	__u8 mac[ETH_ALEN];

	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) < 0)
		return TC_ACT_SHOT;
	__builtin_memcpy(mac, eth.h_dest, ETH_ALEN);
	__builtin_memcpy(eth.h_dest, eth.h_source, ETH_ALEN);
	__builtin_memcpy(eth.h_source, mac, ETH_ALEN);
	if (bpf_skb_store_bytes(skb, 0, &eth, sizeof(eth), 0) < 0)
		return TC_ACT_SHOT;
	return bpf_redirect(skb->ifindex, 0);
}

/* Translate a pod's packet of a known flow towards its backend: to the kernel's routing, or (hairpin)
 * straight back into the pod from LB_HAIRPIN_ADDR. */
static __always_inline int pod_forward(struct __sk_buff *skb, const struct pkt *p, const struct ct_entry *e)
{
	int hairpin = e->flags & CT_F_SNAT;

	if (nat_rewrite(skb, p, hairpin ? e->nat_addr : p->t.saddr, hairpin ? e->nat_port : p->t.sport,
			e->backend_addr, e->backend_port) < 0) {
		stat_inc(STAT_DROP_ERROR);
		return TC_ACT_SHOT;
	}
	return hairpin ? pod_return(skb) : TC_ACT_OK;
}

/* A new pod flow's conntrack entries.  0 on success, else a verdict. */
static __always_inline int pod_new_flow(const struct pkt *p, const struct lb_config *cfg,
					const struct lb_svc_val *svc, __u32 be_id, const struct lb_backend *be,
					struct ct_entry *e, __u64 now)
{
	struct ct_entry rev;
	struct ct_tuple rkey;
	__be32 peer = p->t.saddr;

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
	e->flags = CT_F_LOCAL;
	if (be->addr == p->t.saddr) {
		e->flags = CT_F_SNAT;
		e->nat_addr = bpf_htonl(LB_HAIRPIN_ADDR);
		e->nat_port = p->t.sport;
		peer = e->nat_addr;
	}
	ct_track(e, p, CT_DIR_FWD, now);      /* what the first packet already says (FIN, RST) */
	rev = *e;
	ct_reply_tuple(&rkey, be->addr, be->port, peer, p->t.sport, p->t.proto);
	if (bpf_map_update_elem(&ct_rev, &rkey, &rev, BPF_ANY) < 0 ||
	    bpf_map_update_elem(&ct_fwd, &p->t, e, BPF_ANY) < 0) {
		stat_inc(STAT_DROP_ERROR);
		return TC_ACT_SHOT;
	}
	return 0;
}

/* The reverse entry of a live pod flow that the packet answers (flag: CT_F_LOCAL, or CT_F_SNAT for a
 * hairpin flow), or NULL.  An ended flow's entry lingers until reused or collected, and the pod may reuse the
 * tuple for a connection of its own to the backend (a direct one, or one the socket LB sent there):
 * that one must stay untouched. */
static __always_inline struct ct_entry *pod_flow_reply(const struct pkt *p, const struct lb_config *cfg, __u8 flag,
						       __u64 now)
{
	struct ct_entry *rev = bpf_map_lookup_elem(&ct_rev, &p->t);

	return rev && (rev->flags & flag) && ct_usable(rev, p, cfg, now) ? rev : NULL;
}

/* Show a pod flow's reply from the frontend, to the pod's own address and port.  TC_ACT_OK, or
 * TC_ACT_SHOT when the rewrite failed. */
static __always_inline int pod_reply(struct __sk_buff *skb, const struct pkt *p, struct ct_entry *rev, __u64 now)
{
	ct_account(rev, p, CT_DIR_REV, now);
	if (nat_rewrite(skb, p, rev->fe_addr, rev->fe_port, rev->client_addr, rev->client_port) < 0) {
		stat_inc(STAT_DROP_ERROR);
		return TC_ACT_SHOT;
	}
	stat_inc(STAT_POD_REPLY);
	return TC_ACT_OK;
}

/* tc ingress of a pod's veth (host side): what the pod sends. */
static __always_inline int pod_ingress(struct __sk_buff *skb)
{
	struct lb_config *cfg = config_get();
	struct lb_svc_key key = {};
	struct lb_cidr_key src = { .prefixlen = 32 };
	struct ct_entry *e, fresh = {};
	struct lb_svc_val *svc;
	struct lb_backend *be;
	struct pkt p = {}, sel;
	__u32 be_id = 0;
	__u64 now;
	int rc;

	if (!cfg || frag_parse_pkt(skb, &p) != PARSE_OK)
		return TC_ACT_OK;
	now = bpf_ktime_get_ns();
	if (p.t.daddr == bpf_htonl(LB_HAIRPIN_ADDR)) {
		/* The pod answering its own hairpin flow: translated, and straight back in. */
		e = pod_flow_reply(&p, cfg, CT_F_SNAT, now);
		if (!e)
			return TC_ACT_OK;
		rc = pod_reply(skb, &p, e, now);
		return rc == TC_ACT_OK ? pod_return(skb) : rc;
	}
	key.addr = p.t.daddr;
	key.port = p.t.dport;
	key.proto = p.t.proto;
	svc = ew_lookup(&key);
	if (!svc)
		return TC_ACT_OK;
	src.addr = p.t.saddr;
	if (!bpf_map_lookup_elem(&lb_pod_cidrs, &src)) {
		stat_inc(STAT_POD_SPOOFED);
		return TC_ACT_SHOT;
	}
	e = bpf_map_lookup_elem(&ct_fwd, &p.t);
	if (e && ct_usable(e, &p, cfg, now) && lb_flow_backend(e)) {
		ct_account(e, &p, CT_DIR_FWD, now);
		stat_inc(STAT_FWD_ESTABLISHED);
		return pod_forward(skb, &p, e);
	}
	if (p.t.proto == IPPROTO_TCP && !(p.tcp_flags & TCPF_SYN) && (!e || !ct_alive(e, IPPROTO_TCP, cfg, now)))
		stat_inc(STAT_CT_NO_STATE);   /* mid-stream without state: expired, or never seen here */
	if (svc->count == 0) {
		if (svc->flags & LB_SVC_F_NO_ENDPOINTS) {
			stat_inc(STAT_REJECT_NO_ENDPOINTS);
			return icmp_send_unreach(skb, &p, ICMP_PORT_UNREACH, 0);
		}
		stat_inc(STAT_DROP_NO_LOCAL_BACKEND);
		return TC_ACT_SHOT;
	}
	if (frag_later(&p))
		return TC_ACT_OK;   /* no new flow from a later fragment (frag.h) */
	/* Selected on the real flow, addressed to the frontend whose slots are used. */
	sel = p;
	sel.t.daddr = key.addr;
	sel.t.dport = key.port;
	be = lb_select_backend(&sel, svc, &be_id);
	if (!be) {
		stat_inc(STAT_DROP_NO_BACKEND);
		return TC_ACT_SHOT;
	}
	rc = pod_new_flow(&p, cfg, svc, be_id, be, &fresh, now);
	if (rc)
		return rc;
	stat_inc(STAT_POD_NEW_FLOW);
	return pod_forward(skb, &p, &fresh);
}

/* tc egress of a pod's veth (host side): what the pod receives.  A reply of one of its pod flows
 * (bridged from a local backend, or routed from a remote one) is shown from the frontend. */
static __always_inline int pod_egress(struct __sk_buff *skb)
{
	struct lb_config *cfg = config_get();
	struct ct_entry *rev;
	struct pkt p = {};
	__u64 now;

	if (!cfg || frag_parse_pkt(skb, &p) != PARSE_OK)
		return TC_ACT_OK;
	now = bpf_ktime_get_ns();
	rev = pod_flow_reply(&p, cfg, CT_F_LOCAL, now);
	return rev ? pod_reply(skb, &p, rev, now) : TC_ACT_OK;
}

#endif
