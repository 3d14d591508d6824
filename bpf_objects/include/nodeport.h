/* North-south load balancing on the node's external device: new flows, established flows,
 * replies, in SNAT mode (DSR and Hybrid plug in at the marked places). */
#ifndef BPFLB_NODEPORT_H
#define BPFLB_NODEPORT_H

#include "common.h"
#include "maps.h"
#include "parse.h"
#include "nat.h"
#include "frag.h"
#include "conntrack.h"
#include "lb.h"
#include "icmp.h"
#include "fib.h"
#include "dsr.h"
#include "tunnel.h"
#include "flow.h"
#include "srcrange.h"
#include "reset.h"
#include "hostnat.h"
#include "ct_icmp.h"
#include "direct.h"
#include "neigh.h"

/* A reply to a flow this node SNAT'd towards a remote backend: translate it back to the
 * client and forward it.  Returns a verdict, or -1 when the packet is not such a reply.
 * The route to the client is looked up first, with the reply's length: one too big for it (a smaller
 * MTU on the client's side) would be dropped by the device after a redirect, so the backend is told
 * instead, about the packet it sent (fragmentation needed from the address it sent to, as a router on
 * its path would).  Without DF as well: translated, its source is the frontend, often the node's own
 * address, which the kernel's forwarding refuses (a martian), so it cannot be fragmented here. */
static __always_inline int np_snat_reply(struct __sk_buff *skb, struct pkt *p, const struct lb_config *cfg)
{
	struct ct_entry *rev = ct_snat_reply(p, cfg);
	struct bpf_fib_lookup fib;
	__u64 now;
	int rc = 0;

	if (!rev)
		return -1;
	if (skb_ttl_exhausted(skb))
		return icmp_ttl_exceeded(skb, p, cfg->snat_addr);
	if (!(rev->flags & CT_F_HOST)) {
		rc = fib_lookup_v4(skb, &fib, rev->fe_addr, rev->client_addr, p->t.proto,
				   skb->gso_size ? 0 : p->tot_len);
		if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED) {
			stat_inc(STAT_ICMP_FRAG_NEEDED);
			return icmp_send_unreach(skb, p, ICMP_FRAG_NEEDED, fib.mtu_result);
		}
	}
	now = bpf_ktime_get_ns();
	ct_account(rev, p, CT_DIR_REV, now);
	if (nat_rewrite(skb, p, rev->fe_addr, rev->fe_port, rev->client_addr, rev->client_port) < 0) {
		stat_inc(STAT_DROP_ERROR);
		return TC_ACT_SHOT;
	}
	stat_inc(STAT_REPLY_SNAT);
	if (rev->flags & CT_F_HOST)
		return TC_ACT_OK;   /* a reply to the node's own moved connection: on to its socket */
	return fib_redirect(skb, &fib, rc);
}

/* np_forward's way for a packet too big for the path once grown (the DSR option, the overlay) or for a
 * smaller MTU towards the backend, fib holding the lookup that said so.  With DF: -1, and the caller
 * answers ICMP fragmentation needed (fib->mtu_result kept).  WITHOUT DF a router fragments such a packet
 * (RFC 791, 1812), and so does bpflb, through the kernel, the packet translated as any other (the caller
 * translates it, then forwards it with the returned result and fib):
 * - to a backend behind the overlay, BPF_FIB_LKUP_RET_NO_NEIGH and fib the route to the backend itself:
 *   into the kernel's own VXLAN device (the agent routes every other node's pod CIDR through it, gateway
 *   in that CIDR), which encapsulates the packet as the BPF encapsulation would and lets ip_output
 *   fragment the outer packet (the device leaves outer DF off); the backend's node reassembles it before
 *   decapsulating.  Its source may be the node's (SNAT): it leaves, it never re-enters the node's stack.
 * - otherwise, when the source stays the client's (DSR, a local backend), BPF_FIB_LKUP_RET_FRAG_NEEDED:
 *   fib_redirect hands it to the kernel's forwarding (TC_ACT_OK), which routes it as the FIB lookup did,
 *   decrements the TTL and fragments it (ip_forward, ip_fragment; the DSR option has the copy bit, so
 *   every fragment carries it).
 * A SNAT'd packet has no such way (the kernel drops a packet from its own address arriving from outside
 * as a martian): -1.  Off the common path, a BPF function of its own (np_forward is inlined twice). */
static __attribute__((noinline)) int np_too_big(struct __sk_buff *skb, const struct pkt *p, const struct ct_entry *e,
						const struct lb_config *cfg, struct bpf_fib_lookup *fib)
{
	__u16 mtu = fib->mtu_result;
	struct lb_tunnel_ep *ep;
	__be32 node = 0;
	int rc;

	if (skb_ip_df(skb))
		return -1;
	if (cfg->tunnel_mode == TUNNEL_VXLAN && !(e->flags & CT_F_LOCAL)) {
		ep = tunnel_endpoint(e->backend_addr);
		if (ep && ep->node_addr != cfg->snat_addr)
			node = ep->node_addr;
	}
	if (node) {
		rc = fib_lookup_v4(skb, fib, (e->flags & (CT_F_SNAT | CT_F_PORTMAP)) ? e->nat_addr : p->t.saddr,
				   e->backend_addr, p->t.proto, 0);
		/* tot_len 0: the helper checks the skb against the route's device and says FRAG_NEEDED, the
		 * lookup otherwise done (fib filled in), for one too big for it, as this packet is. */
		if ((rc == BPF_FIB_LKUP_RET_SUCCESS || rc == BPF_FIB_LKUP_RET_NO_NEIGH ||
		     rc == BPF_FIB_LKUP_RET_FRAG_NEEDED) && fib->ifindex != cfg->ext_ifindex) {
			ep = tunnel_endpoint(fib->ipv4_dst);
			if (ep && ep->node_addr == node && fib->ipv4_dst != node) {
				stat_inc(STAT_FWD_FRAGMENTED);
				return BPF_FIB_LKUP_RET_NO_NEIGH;   /* the neighbour output writes the MACs */
			}
		}
		fib->mtu_result = mtu;
	}
	if (e->flags & CT_F_SNAT)
		return -1;
	stat_inc(STAT_FWD_FRAGMENTED);
	return BPF_FIB_LKUP_RET_FRAG_NEEDED;
}

/* Translate a packet of a known flow towards its backend and forward it.
 * SNAT: source becomes this node.  DSR: DNAT only, plus the frontend in an IPv4 option when
 * dsr_needs_opt().  A remote backend behind the VXLAN overlay: the result is encapsulated to its
 * node.  The route is looked up before the packet is touched, so growth (option, overlay) that
 * would not fit the path MTU is never a silent drop: a packet with DF becomes ICMP
 * fragmentation-needed for the client, one without is fragmented by the kernel (np_too_big). */
static __always_inline int np_forward(struct __sk_buff *skb, struct pkt *p, const struct ct_entry *e,
				      const struct lb_config *cfg)
{
	struct bpf_fib_lookup fib;
	struct lb_tunnel_ep *ep = NULL;
	__be32 saddr = p->t.saddr, node = 0;
	__be16 sport = p->t.sport;
	int opt = (e->flags & CT_F_DSR) && dsr_needs_opt(p);
	__u32 growth = opt ? sizeof(struct dsr_opt_v4) : 0;
	int rc;

	if (e->flags & (CT_F_SNAT | CT_F_PORTMAP)) {
		saddr = e->nat_addr;
		sport = e->nat_port;
	}
	if (cfg->tunnel_mode == TUNNEL_VXLAN && !(e->flags & CT_F_LOCAL)) {
		ep = tunnel_endpoint(e->backend_addr);
		if (ep && ep->node_addr != cfg->snat_addr) {
			node = ep->node_addr;
			growth += VXLAN_OVERHEAD;
		}
	}
	if (node)
		rc = fib_lookup_v4(skb, &fib, cfg->snat_addr, node, IPPROTO_UDP,
				   skb->gso_size ? 0 : p->tot_len + growth);
	else   /* the route's MTU too (tot_len), so a smaller MTU towards the backend is told, not a drop */
		rc = fib_lookup_v4(skb, &fib, saddr, e->backend_addr, p->t.proto,
				   skb->gso_size ? 0 : p->tot_len + growth);
	if (__builtin_expect(rc == BPF_FIB_LKUP_RET_FRAG_NEEDED, 0)) {   /* out of the common path's line */
		rc = np_too_big(skb, p, e, cfg, &fib);
		if (rc < 0) {
			stat_inc(STAT_ICMP_FRAG_NEEDED);
			return icmp_send_unreach(skb, p, ICMP_FRAG_NEEDED, fib.mtu_result - growth);
		}
		node = 0;   /* the kernel encapsulates it (its VXLAN device) or forwards it */
	}
	if (nat_rewrite(skb, p, saddr, sport, e->backend_addr, e->backend_port) < 0 ||
	    (opt && dsr_insert_opt(skb, p, e->fe_addr, e->fe_port) < 0)) {
		stat_inc(STAT_DROP_ERROR);
		return TC_ACT_SHOT;
	}
	if (!node)
		return fib_redirect(skb, &fib, rc);
	/* Forwarding the inner packet decrements its TTL; the outer header is new. */
	if (l2_l3_forward_edit(skb, NULL, NULL, 1) < 0) {
		stat_inc(STAT_DROP_TTL_EXCEEDED);
		return TC_ACT_SHOT;
	}
	if (vxlan_encap(skb, cfg->snat_addr, node, cfg->tunnel_vni) < 0) {
		stat_inc(STAT_DROP_ERROR);
		return TC_ACT_SHOT;
	}
	stat_inc(STAT_TUNNEL_ENCAP);
	return fib_redirect_ttl(skb, &fib, rc, 0);
}

/* tc ingress on the external device (and on the overlay device). */
static __always_inline int np_ingress(struct __sk_buff *skb)
{
	struct lb_config *cfg;
	struct pkt p = {};
	struct ct_entry *e, fresh = {};
	struct lb_svc_val *svc;
	struct lb_backend *be;
	__u32 be_id = 0;
	__u64 now;
	int rc;

	/* A frame to another host's MAC (a promiscuous or bridged device, a flooding L2) is not this node's to
	 * balance, translate or forward: the kernel's IP stack drops it, and so it stays.  Nor is one to a
	 * broadcast or multicast MAC: the kernel neither forwards it nor lets TCP take it, and every node of the
	 * segment receives it (an externalIP's SYN would become a connection per node). */
	if (skb->pkt_type == PACKET_OTHERHOST) {
		stat_inc(STAT_PASS_OTHER_HOST);
		return TC_ACT_OK;
	}
	if (skb->pkt_type != PACKET_HOST) {
		if (skb->protocol == bpf_htons(ETH_P_IP))     /* (ARP and IPv6 neighbour discovery are not counted) */
			stat_inc(STAT_PASS_L2_GROUP);
		return TC_ACT_OK;
	}
	cfg = config_get();
	if (!cfg)
		return TC_ACT_OK;
	switch (frag_parse_pkt(skb, &p)) {
	case PARSE_OK:
		break;
	case PARSE_FRAGMENT:   /* a later fragment whose first one was not translated here */
		stat_inc(STAT_PASS_FRAGMENT);
		return TC_ACT_OK;
	case PARSE_TRUNCATED:
		stat_inc(STAT_PASS_TRUNCATED);
		return TC_ACT_OK;
	case PARSE_OTHER_L4:
		if (p.t.proto != IPPROTO_ICMP)
			return TC_ACT_OK;
		rc = ct_icmp_ingress(skb, &p, cfg);
		return rc >= 0 ? rc : TC_ACT_OK;
	default:
		return TC_ACT_OK;
	}
	rc = np_snat_reply(skb, &p, cfg);
	if (rc >= 0)
		return rc;
	if (p.ihl_bytes > sizeof(struct iphdr)) {
		/* Only packets with IP options can be DSR requests for a pod of this node. */
		rc = dsr_backend_ingress(skb, &p, cfg, bpf_ktime_get_ns());
		if (rc == -2)
			return fib_forward(skb, p.t.saddr, p.t.daddr, p.t.proto, p.tot_len);
		if (rc >= 0)
			return rc;
	}

	/* Every packet of a flow is addressed to its frontend: one lookup settles non-service traffic. */
	svc = lb_lookup_service(&p);
	if (!svc || (svc->flags & LB_SVC_F_CLUSTER_IP)) {   /* a ClusterIP is not served from outside */
		rc = dsr_mapped_ingress(skb, &p, cfg);
		if (rc >= 0)
			return rc;
		direct_ingress(&p);
		stat_inc(STAT_PASS_NOT_SERVICE);
		return TC_ACT_OK;
	}
	if (srcrange_denied(&p, svc))
		return TC_ACT_SHOT;
	now = bpf_ktime_get_ns();
	e = bpf_map_lookup_elem(&ct_fwd, &p.t);
	if (e && ct_usable(e, &p, cfg, now) && lb_flow_backend(e)) {
		if (skb_ttl_exhausted(skb))
			return icmp_ttl_exceeded(skb, &p, cfg->snat_addr);
		ct_account(e, &p, CT_DIR_FWD, now);
		stat_inc(STAT_FWD_ESTABLISHED);
		return np_forward(skb, &p, e, cfg);
	}
	if (frag_later(&p)) {
		stat_inc(STAT_PASS_FRAGMENT);
		return TC_ACT_OK;
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
	if (skb_ttl_exhausted(skb))
		return icmp_ttl_exceeded(skb, &p, cfg->snat_addr);
	be = lb_select_backend(&p, svc, &be_id);
	if (!be) {
		stat_inc(STAT_DROP_NO_BACKEND);
		return TC_ACT_SHOT;
	}
	rc = np_new_flow(skb, &p, cfg, svc, be_id, be, &fresh, e, now);
	if (rc)
		return flow_refuse(skb, &p, rc);
	stat_inc(STAT_NEW_FLOW);
	return np_forward(skb, &p, &fresh, cfg);
}

/* A reply of a flow DNAT'd to a pod of this node (rev, its reverse entry: a local backend, or a DSR
 * request this node delivered to a local pod), shown from the frontend the client used.  A verdict, or
 * -1 when rev is another kind of flow (one this node SNAT'd: its replies come back through lb_ingress). */
static __always_inline int np_local_reply(struct __sk_buff *skb, struct pkt *p, struct ct_entry *rev)
{
	if (!(rev->flags & (CT_F_LOCAL | CT_F_DSR)))
		return -1;
	ct_account(rev, p, CT_DIR_REV, bpf_ktime_get_ns());
	/* CT_F_PORTMAP: the pod answered the client's remapped port; the client's own port goes back. */
	if (nat_rewrite(skb, p, rev->fe_addr, rev->fe_port, p->t.daddr,
			(rev->flags & CT_F_PORTMAP) ? rev->client_port : p->t.dport) < 0) {
		stat_inc(STAT_DROP_ERROR);
		return TC_ACT_SHOT;
	}
	stat_inc(STAT_REPLY_DNAT);
	return TC_ACT_OK;
}

/* The part both egress programs start with: the replies np_local_reply shows from their frontend, and
 * the ICMP errors about those flows (ct_icmp_egress).  A verdict, or -1: p is a parsed TCP/UDP packet
 * (or a fragment followed to its flow) that no flow's reverse entry knows, for the program's own rules. */
static __always_inline int np_egress_local(struct __sk_buff *skb, struct pkt *p)
{
	struct ct_entry *rev;
	int rc;

	switch (frag_parse_pkt(skb, p)) {
	case PARSE_OK:
		break;
	case PARSE_OTHER_L4:
		if (p->t.proto != IPPROTO_ICMP)
			return TC_ACT_OK;
		rc = ct_icmp_egress(skb, p);
		return rc >= 0 ? rc : TC_ACT_OK;
	default:
		return TC_ACT_OK;
	}
	rev = bpf_map_lookup_elem(&ct_rev, &p->t);
	if (!rev)
		return -1;
	rc = np_local_reply(skb, p, rev);
	return rc >= 0 ? rc : TC_ACT_OK;
}

/* tc egress on the external device: replies of flows DNAT'd to a local backend, and replies of
 * DSR flows whose requests this node delivered to a local pod. */
static __always_inline int np_egress(struct __sk_buff *skb)
{
	struct lb_config *cfg = config_get();
	struct pkt p = {};
	int rc;

	if (!cfg)
		return TC_ACT_OK;
	rc = np_egress_local(skb, &p);
	if (rc >= 0)
		return rc;
	rc = hostnat_egress(skb, &p, cfg);
	if (rc >= 0)
		return rc;
	if (dsr_untracked_reply(&p) && !direct_egress(&p, cfg, bpf_ktime_get_ns())) {
		stat_inc(STAT_DROP_DSR_NO_STATE);
		return TC_ACT_SHOT;
	}
	rc = tunnel_egress(skb, &p, cfg);
	return rc >= 0 ? rc : TC_ACT_OK;
}

/* tc egress on the overlay device (tunnelMode VXLAN).  Two kinds of packets leave here, before the kernel
 * encapsulates them, that never cross the external device's egress as TCP/UDP:
 * - a local pod's reply to a client that is another node's pod (routed through the overlay), of a flow
 *   this node DNAT'd to it: shown from the frontend, as lb_egress does on the external device;
 * - the node's own connections to another node's pods: moved off ports a SNAT'd flow holds (hostnat.h);
 *   their replies come back decapsulated through lb_ingress on this device.
 * Nothing else is touched (the pods' own overlay traffic passes). */
static __always_inline int np_overlay_egress(struct __sk_buff *skb)
{
	struct lb_config *cfg = config_get();
	struct pkt p = {};
	int rc;

	if (!cfg)
		return TC_ACT_OK;
	rc = np_egress_local(skb, &p);
	if (rc >= 0)
		return rc;
	rc = hostnat_egress(skb, &p, cfg);
	return rc >= 0 ? rc : TC_ACT_OK;
}

#endif
