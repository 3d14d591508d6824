/* Direct server return: the frontend travels to the backend's node in an IPv4 option (Cilium's
 * format), the backend's node records it and rewrites the pod's replies to come from the frontend,
 * straight to the client.
 *
 * Anyone can put the option on a packet (a pod can set IP options, a client can), and frontends are
 * public, so the backend's node honours it only for a packet whose destination is one of its own
 * backends of the Service owning the named frontend, on that Service's target port and protocol
 * (lb_dsr_backends).  Anything else is dropped before any state exists: otherwise the option would be a
 * relay past the node's FORWARD chain and rp_filter to any port of any address, with replies disguised
 * as the frontend's. */
#ifndef BPFLB_DSR_H
#define BPFLB_DSR_H

#include "common.h"
#include "maps.h"
#include "parse.h"
#include "nat.h"
#include "conntrack.h"
#include "fib.h"
#include "icmp.h"

/* Every frontend of the cluster a DSR option may name (all nodes' NodePorts, LB IPs, external IPs)
 * -> LB_DSR_FE_*: under which address its backends are listed in lb_dsr_backends. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct lb_l4_key);
	__type(value, __u8);
	__uint(max_entries, LB_SERVICES_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_dsr_frontends SEC(".maps");

/* This node's backends (serving or draining) of each frontend a DSR request may name: NodePorts once
 * under address 0 rather than once per node address (a nodePort is unique in the cluster). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct lb_dsr_member);
	__type(value, __u8);
	__uint(max_entries, LB_DSR_BACKENDS_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_dsr_backends SEC(".maps");

/* Whether this node may hold DSR flows whose client port was remapped (dsr_portmap): non-service packets
 * look in ct_fwd for such a flow's mapping only then.  [0] counts mappings, incremented before each is
 * written; [1] is a value of [0] the agent's conntrack collector read before a scan that began over a
 * millisecond later (every program that incremented [0] earlier has written its entry by then) and found no
 * mapping.  Equal: none exists.  A mapping made meanwhile moves [0] on, so the gate stays open; the agent
 * opens it at start ([1] = [0] - 1), for mappings a previous agent's datapath made. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 2);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_dsr_mapped SEC(".maps");

/* True when this node may hold a remapped DSR flow (see lb_dsr_mapped). */
static __always_inline int dsr_mapped_possible(void)
{
	__u32 made = 0, cleared = 1;
	__u64 *m = bpf_map_lookup_elem(&lb_dsr_mapped, &made), *c = bpf_map_lookup_elem(&lb_dsr_mapped, &cleared);

	return !m || !c || *m != *c;
}

/* This node's backend endpoints: their replies must never leave untranslated. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct lb_l4_key);
	__type(value, __u8);
	__uint(max_entries, LB_BACKENDS_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_local_backends SEC(".maps");

/* The cluster's own addresses (node addresses, pod CIDRs): replies to them need no DSR state. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct lb_cidr_key);
	__type(value, __u8);
	__uint(max_entries, 4096);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_cluster_cidrs SEC(".maps");

struct dsr_opt_v4 {
	__u8 type;
	__u8 len;
	__be16 port;
	__be32 addr;
};

/* Should a new flow to a remote backend go by DSR in this mode? */
static __always_inline int dsr_mode_applies(__u32 mode, __u8 proto)
{
	return mode == LB_MODE_DSR || (mode == LB_MODE_HYBRID && proto == IPPROTO_TCP);
}

/* Does this packet of a DSR flow carry the option?  TCP: only SYNs (first and retransmitted);
 * UDP: every datagram. */
static __always_inline int dsr_needs_opt(const struct pkt *p)
{
	if (p->t.proto == IPPROTO_UDP)
		return 1;
	return (p->tcp_flags & (TCPF_SYN | TCPF_ACK)) == TCPF_SYN;
}

/* Fix IHL, total length and the header checksum after the option was inserted (grow) or removed
 * right after the base header, and move p's offsets with it.  The L4 header and its checksum are
 * untouched: the pseudo-header's length does not change. */
static __always_inline void dsr_opt_fixup(struct iphdr *ip, struct pkt *p, const struct dsr_opt_v4 *opt, int grow)
{
	__u32 old_w, new_w, diff, opt_w[2];
	__s32 delta = grow ? (__s32)sizeof(*opt) : -(__s32)sizeof(*opt);

	__builtin_memcpy(&old_w, ip, sizeof(old_w));          /* version/IHL, TOS, total length */
	ip->ihl += delta / 4;
	ip->tot_len = bpf_htons(bpf_ntohs(ip->tot_len) + delta);
	__builtin_memcpy(&new_w, ip, sizeof(new_w));
	__builtin_memcpy(opt_w, opt, sizeof(opt_w));
	diff = csum_add32(0, ~old_w);
	diff = csum_add32(diff, new_w);
	diff = csum_add32(diff, grow ? opt_w[0] : ~opt_w[0]);
	diff = csum_add32(diff, grow ? opt_w[1] : ~opt_w[1]);
	ip->check = csum_apply(ip->check, diff);
	p->ihl_bytes += delta;
	p->l4_off += delta;
	p->csum_off += delta;
	p->tot_len += delta;
}

/* Grow the IPv4 header by the option, right after the 20-byte base header, and fix IHL, total
 * length and the header checksum.  The L4 header and its checksum are untouched (the pseudo-header
 * length does not change).  Updates p's offsets; 0 on success. */
static __always_inline int dsr_insert_opt(struct __sk_buff *skb, struct pkt *p, __be32 fe_addr, __be16 fe_port)
{
	struct dsr_opt_v4 opt = { .type = DSR_OPT_TYPE, .len = DSR_OPT_LEN, .port = fe_port, .addr = fe_addr };
	void *data, *data_end;
	struct iphdr *ip;

	if (p->ihl_bytes + sizeof(opt) > 60)
		return -1;
	if (bpf_skb_adjust_room(skb, sizeof(opt), BPF_ADJ_ROOM_NET, 0) < 0)
		return -1;
	if (bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(struct iphdr), &opt, sizeof(opt), 0) < 0)
		return -1;
	data = skb_data(skb);
	data_end = skb_data_end(skb);
	ip = data + ETH_HLEN;
	if ((void *)(ip + 1) > data_end)
		return -1;
	dsr_opt_fixup(ip, p, &opt, 1);
	stat_inc(STAT_DSR_OPT_INSERTED);
	return 0;
}

/* The frontend named by a DSR option in first position, if the packet carries one; 1 when found. */
static __always_inline int dsr_read_opt(struct __sk_buff *skb, const struct pkt *p, struct dsr_opt_v4 *opt)
{
	if (p->ihl_bytes < sizeof(struct iphdr) + sizeof(*opt))
		return 0;
	if (bpf_skb_load_bytes(skb, ETH_HLEN + sizeof(struct iphdr), opt, sizeof(*opt)) < 0)
		return 0;
	return opt->type == DSR_OPT_TYPE && opt->len == DSR_OPT_LEN;
}

/* Remove the option again so the pod receives the packet as the client sent it (bar the DNAT). */
static __always_inline int dsr_strip_opt(struct __sk_buff *skb, struct pkt *p, const struct dsr_opt_v4 *opt)
{
	void *data, *data_end;
	struct iphdr *ip;

	if (bpf_skb_adjust_room(skb, -(__s32)sizeof(*opt), BPF_ADJ_ROOM_NET, 0) < 0)
		return -1;
	data = skb_data(skb);
	data_end = skb_data_end(skb);
	ip = data + ETH_HLEN;
	if ((void *)(ip + 1) > data_end)
		return -1;
	dsr_opt_fixup(ip, p, opt, 0);
	return 0;
}

/* May a request naming frontend opt be delivered to the packet's destination?  Only when that is a
 * backend of this node for the frontend, on its target port and protocol. */
static __always_inline int dsr_accepts(const struct pkt *p, const struct dsr_opt_v4 *opt)
{
	struct lb_l4_key fe = { .addr = opt->addr, .port = opt->port, .proto = p->t.proto };
	struct lb_dsr_member m = {
		.be_addr = p->t.daddr,
		.fe_port = opt->port,
		.be_port = p->t.dport,
		.proto = p->t.proto,
	};
	__u8 *kind = bpf_map_lookup_elem(&lb_dsr_frontends, &fe);

	if (!kind)
		return 0;
	m.fe_addr = *kind == LB_DSR_FE_NODEPORT ? 0 : opt->addr;
	return bpf_map_lookup_elem(&lb_dsr_backends, &m) != NULL;
}

/* Backend node, a DSR request whose tuple the pod still holds for another flow (ct_rev_held: another
 * frontend's live flow, or a connection in its TIME_WAIT): the flow gets another client port, as a local
 * flow does (flow.h).  Its requests arrive with the client's port and, TCP past the SYN, without the
 * option, so the mapping lives in ct_fwd under the tuple they arrive with (client -> pod), found again by
 * the flow's later requests here and in dsr_mapped_ingress.  A mapping of an earlier flow that this
 * request does not continue is removed.  Returns the client port the pod is to see (network order), 0 to
 * keep the client's own.  rev and rkey: the flow's reverse entry and key, updated when remapped. */
static __always_inline __be16 dsr_portmap(const struct pkt *p, const struct lb_config *cfg, struct ct_entry *rev,
					  struct ct_tuple *rkey, __u64 now)
{
	struct ct_entry *m = bpf_map_lookup_elem(&ct_fwd, &p->t);
	__u64 *made;
	__u32 zero = 0;

	if (m && (m->flags & CT_F_PORTMAP)) {
		if (m->fe_addr == rev->fe_addr && m->fe_port == rev->fe_port && ct_usable(m, p, cfg, now)) {
			ct_account(m, p, CT_DIR_FWD, now);
			return m->nat_port;
		}
		bpf_map_delete_elem(&ct_fwd, &p->t);
	}
	if (!ct_rev_held(rkey, rev, p->t.proto, cfg, now) || ct_portmap(cfg, rev, rkey) < 0)
		return 0;
	made = bpf_map_lookup_elem(&lb_dsr_mapped, &zero);
	if (made)
		__sync_fetch_and_add(made, 1);      /* before the entry exists: see lb_dsr_mapped */
	if (bpf_map_update_elem(&ct_fwd, &p->t, rev, BPF_ANY) < 0) {
		bpf_map_delete_elem(&ct_rev, rkey);
		return 0;
	}
	return rev->nat_port;
}

/* Backend node, ingress: a TCP segment without the option of a DSR flow dsr_portmap gave another client
 * port: rewritten to that port and delivered.  -1 when the packet is no such segment. */
static __always_inline int dsr_mapped_ingress(struct __sk_buff *skb, struct pkt *p, const struct lb_config *cfg)
{
	struct ct_entry *m;
	__u64 now;

	if (!dsr_mapped_possible())
		return -1;
	m = bpf_map_lookup_elem(&ct_fwd, &p->t);
	if (!m || (m->flags & (CT_F_DSR | CT_F_PORTMAP)) != (CT_F_DSR | CT_F_PORTMAP))
		return -1;
	now = bpf_ktime_get_ns();
	if (!ct_alive(m, p->t.proto, cfg, now))
		return -1;
	if (skb_ttl_exhausted(skb))
		return icmp_ttl_exceeded(skb, p, cfg->snat_addr);
	ct_account(m, p, CT_DIR_FWD, now);
	if (nat_rewrite(skb, p, p->t.saddr, m->nat_port, p->t.daddr, p->t.dport) < 0) {
		stat_inc(STAT_DROP_ERROR);
		return TC_ACT_SHOT;
	}
	return fib_forward(skb, p->t.saddr, p->t.daddr, p->t.proto, p->tot_len);
}

/* Backend node, ingress: a request carrying a DSR option.  For one of its backends of the named
 * frontend: record how to translate the pod's replies, strip the option, deliver.  Anything else: drop
 * and count, no state.  Returns a verdict, -2 when accepted (the caller forwards the stripped packet),
 * or -1 when the packet carries no DSR option. */
static __always_inline int dsr_backend_ingress(struct __sk_buff *skb, struct pkt *p, const struct lb_config *cfg,
					       __u64 now)
{
	struct dsr_opt_v4 opt;
	struct ct_entry rev = {};
	struct ct_tuple rkey;
	__be16 mapped;

	if (!dsr_read_opt(skb, p, &opt))
		return -1;
	if (!dsr_accepts(p, &opt)) {
		stat_inc(STAT_DROP_DSR_SPOOFED);
		return TC_ACT_SHOT;
	}
	if (skb_ttl_exhausted(skb))
		return icmp_ttl_exceeded(skb, p, cfg->snat_addr);
	rev.last_seen = now;
	rev.fe_addr = opt.addr;
	rev.fe_port = opt.port;
	rev.client_addr = p->t.saddr;
	rev.client_port = p->t.sport;
	rev.backend_addr = p->t.daddr;
	rev.backend_port = p->t.dport;
	rev.flags = CT_F_DSR;
	rev.mode = LB_MODE_DSR;
	ct_reply_tuple(&rkey, p->t.daddr, p->t.dport, p->t.saddr, p->t.sport, p->t.proto);
	mapped = dsr_portmap(p, cfg, &rev, &rkey, now);
	if (!mapped && ct_record_dsr_rev(&rkey, &rev, p, now) < 0) {
		stat_inc(STAT_DROP_ERROR);
		return TC_ACT_SHOT;
	}
	if (dsr_strip_opt(skb, p, &opt) < 0 ||
	    (mapped && nat_rewrite(skb, p, p->t.saddr, mapped, p->t.daddr, p->t.dport) < 0)) {
		stat_inc(STAT_DROP_ERROR);
		return TC_ACT_SHOT;
	}
	if (!mapped)   /* a first fragment: the rest of its datagram follows (a remapped one nat_rewrite recorded) */
		frag_record(p);
	stat_inc(STAT_DSR_ACCEPTED);
	return -2;   /* accepted: the caller forwards it like any packet to a pod */
}

/* Egress: a TCP packet from one of this node's backend endpoints to outside the cluster with no
 * translation state.  It may be the reply of a DSR flow whose SYN this node never saw or whose state
 * was lost, which must not leak the pod's address; it may also be a flow the load balancer never made
 * (direct.h tells).  True when the packet is such a packet. */
static __always_inline int dsr_untracked_reply(const struct pkt *p)
{
	struct lb_l4_key be = { .addr = p->t.saddr, .port = p->t.sport, .proto = p->t.proto };
	struct lb_cidr_key dst = { .prefixlen = 32, .addr = p->t.daddr };

	if (p->t.proto != IPPROTO_TCP || !bpf_map_lookup_elem(&lb_local_backends, &be))
		return 0;
	return !bpf_map_lookup_elem(&lb_cluster_cidrs, &dst);
}

#endif
