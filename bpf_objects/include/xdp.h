/* The XDP fast path (xdpAcceleration): requests for remote backends (SNAT, DSR, Hybrid) and the
 * replies of SNAT'd flows, translated and transmitted straight back out.  It shares every map with
 * tc, so a flow is handled the same whichever layer sees its packets; anything it cannot finish
 * before touching the packet (local backends, rejects, MTU, unresolved neighbours, IP options, the
 * overlay, TTL about to run out) is passed on, unmodified, to the tc programs.  A new flow's backend
 * is chosen once: when XDP chose it (a local one included), it recorded the flow before passing the
 * packet, and tc carries on with that flow instead of choosing again. */
#ifndef BPFLB_XDP_H
#define BPFLB_XDP_H

#include "common.h"
#include "maps.h"
#include "parse.h"
#include "nat.h"
#include "conntrack.h"
#include "lb.h"
#include "flow.h"
#include "fib.h"
#include "dsr.h"
#include "srcrange.h"
#include "neigh.h"

/* The kernel's own view of the receiving device, relocated against its BTF (CO-RE): XDP runs before
 * eth_type_trans, so it has no pkt_type, and reads the device's MAC itself.  dev_addr_shadow is the
 * kernel's copy of dev_addr, kept in step by every address change (dev_addr_mod). */
struct net_device___bpflb {
	unsigned char dev_addr_shadow[32];   /* MAX_ADDR_LEN */
} __attribute__((preserve_access_index));

struct xdp_rxq_info___bpflb {
	struct net_device___bpflb *dev;
} __attribute__((preserve_access_index));

struct xdp_buff___bpflb {
	struct xdp_rxq_info___bpflb *rxq;
} __attribute__((preserve_access_index));

extern void *bpf_cast_to_kern_ctx(void *obj) __ksym;

/* Is the frame addressed to anything but the device's own MAC: another host's (what tc sees as
 * PACKET_OTHERHOST), or a group, broadcast or multicast (PACKET_BROADCAST, PACKET_MULTICAST)?  tc passes
 * and counts those. */
static __always_inline int xdp_not_to_host(struct xdp_md *ctx, const struct ethhdr *eth)
{
	struct xdp_buff___bpflb *kctx = bpf_cast_to_kern_ctx(ctx);
	struct net_device___bpflb *dev = kctx->rxq->dev;
	__u32 i;

	if (eth->h_dest[0] & 1)
		return 1;
#pragma unroll
	for (i = 0; i < ETH_ALEN; i++)
		if (eth->h_dest[i] != dev->dev_addr_shadow[i])
			return 1;
	return 0;
}

static __always_inline int xdp_fib(struct xdp_md *ctx, struct bpf_fib_lookup *fib, __be32 saddr, __be32 daddr,
				   __u8 proto, __u16 tot_len)
{
	fib_params(fib, saddr, daddr, proto, tot_len, ctx->ingress_ifindex);
	return bpf_fib_lookup(ctx, fib, sizeof(*fib), 0);
}

/* Rewrite addresses and ports with full incremental checksums (XDP frames carry complete ones).
 * 0 on success. */
static __always_inline int xdp_rewrite(struct xdp_md *ctx, const struct pkt *p, __be32 saddr, __be16 sport,
				       __be32 daddr, __be16 dport)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct iphdr *ip = data + ETH_HLEN;
	__u32 l4_off = p->l4_off & 0x7f, csum_off = p->csum_off & 0x7f;
	__be16 from_ports[2] = { p->t.sport, p->t.dport }, to_ports[2] = { sport, dport };
	__u32 addr_diff = 0, diff, old_w, new_w;
	__u16 *l4csum;

	if ((void *)(ip + 1) > data_end || data + l4_off + sizeof(to_ports) > data_end ||
	    data + csum_off + sizeof(__u16) > data_end)
		return -1;
	l4csum = data + csum_off;
	addr_diff = csum_add32(addr_diff, ~p->t.saddr);
	addr_diff = csum_add32(addr_diff, saddr);
	addr_diff = csum_add32(addr_diff, ~p->t.daddr);
	addr_diff = csum_add32(addr_diff, daddr);
	__builtin_memcpy(&old_w, from_ports, sizeof(old_w));
	__builtin_memcpy(&new_w, to_ports, sizeof(new_w));
	diff = csum_add32(addr_diff, ~old_w);
	diff = csum_add32(diff, new_w);
	if (!(p->t.proto == IPPROTO_UDP && *l4csum == 0)) {
		__u16 sum = csum_apply(*l4csum, diff);

		*l4csum = (p->t.proto == IPPROTO_UDP && sum == 0) ? 0xffff : sum;
	}
	ip->saddr = saddr;
	ip->daddr = daddr;
	ip->check = csum_apply(ip->check, addr_diff);
	__builtin_memcpy(data + l4_off, to_ports, sizeof(to_ports));
	return 0;
}

/* Grow the IPv4 header by the DSR option (right after the base header, as on tc). 0 on success. */
static __always_inline int xdp_insert_dsr_opt(struct xdp_md *ctx, struct pkt *p, __be32 fe_addr, __be16 fe_port)
{
	struct dsr_opt_v4 opt = { .type = DSR_OPT_TYPE, .len = DSR_OPT_LEN, .port = fe_port, .addr = fe_addr };
	__u8 head[ETH_HLEN + sizeof(struct iphdr)];
	void *data, *data_end;

	if (p->ihl_bytes + sizeof(opt) > 60 || bpf_xdp_adjust_head(ctx, -(int)sizeof(opt)) < 0)
		return -1;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (data + sizeof(opt) + sizeof(head) > data_end)
		return -1;
	__builtin_memcpy(head, data + sizeof(opt), sizeof(head));     /* Ethernet + base IPv4 header */
	__builtin_memcpy(data, head, sizeof(head));
	__builtin_memcpy(data + sizeof(head), &opt, sizeof(opt));
	dsr_opt_fixup(data + ETH_HLEN, p, &opt, 1);
	stat_inc(STAT_DSR_OPT_INSERTED);
	return 0;
}

/* TTL, MACs, and out: back out of the device it came in on (XDP_TX) or to another one. */
static __always_inline int xdp_transmit(struct xdp_md *ctx, const struct bpf_fib_lookup *fib)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + ETH_HLEN;
	__u32 check;

	if ((void *)(ip + 1) > data_end)
		return XDP_DROP;
	if (ip->ttl <= 1) {            /* xdp_lb passed these to tc already; never sent with TTL 0 */
		stat_inc(STAT_DROP_TTL_EXCEEDED);
		return XDP_DROP;
	}
	ip->ttl--;
	check = ip->check;
	check += bpf_htons(0x0100);
	ip->check = (__u16)(check + (check >= 0xFFFF));
	__builtin_memcpy(eth->h_dest, fib->dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib->smac, ETH_ALEN);
	stat_inc(STAT_XDP_TX);
	if (fib->ifindex == ctx->ingress_ifindex)
		return XDP_TX;
	return bpf_redirect(fib->ifindex, 0);
}

static __always_inline int xdp_to_tc(void)
{
	stat_inc(STAT_XDP_TO_TC);
	return XDP_PASS;
}

/* The reply of a flow this node SNAT'd: back to the frontend -> client, and out. -1: not one. */
static __always_inline int xdp_snat_reply(struct xdp_md *ctx, struct pkt *p, const struct lb_config *cfg)
{
	struct bpf_fib_lookup fib;
	struct ct_entry *rev = ct_snat_reply(p, cfg);
	__u64 now;

	if (!rev)
		return -1;
	if ((rev->flags & CT_F_HOST) ||
	    xdp_fib(ctx, &fib, rev->fe_addr, rev->client_addr, p->t.proto, p->tot_len) != BPF_FIB_LKUP_RET_SUCCESS)
		return xdp_to_tc();   /* the node's own moved connections (tc delivers them), MTU (tc tells), ... */
	now = bpf_ktime_get_ns();
	if (xdp_neigh_check_due(&fib, p, now))
		return xdp_to_tc();
	ct_account(rev, p, CT_DIR_REV, now);
	if (xdp_rewrite(ctx, p, rev->fe_addr, rev->fe_port, rev->client_addr, rev->client_port) < 0)
		return XDP_DROP;
	stat_inc(STAT_REPLY_SNAT);
	return xdp_transmit(ctx, &fib);
}

/* A packet of a flow to a remote backend: route first (nothing changed yet, so tc can take over),
 * then SNAT or DNAT + DSR option, then out. */
static __always_inline int xdp_forward(struct xdp_md *ctx, struct pkt *p, const struct ct_entry *e, __u64 now)
{
	struct bpf_fib_lookup fib;
	__be32 saddr = p->t.saddr;
	__be16 sport = p->t.sport;
	int opt = (e->flags & CT_F_DSR) && dsr_needs_opt(p);
	int rc;

	if (e->flags & CT_F_SNAT) {
		saddr = e->nat_addr;
		sport = e->nat_port;
	}
	rc = xdp_fib(ctx, &fib, saddr, e->backend_addr, p->t.proto,
		     p->tot_len + (opt ? sizeof(struct dsr_opt_v4) : 0));
	if (rc != BPF_FIB_LKUP_RET_SUCCESS || xdp_neigh_check_due(&fib, p, now))
		return xdp_to_tc();   /* unresolved or unchecked neighbour, MTU (ICMP from tc), not forwardable */
	if (xdp_rewrite(ctx, p, saddr, sport, e->backend_addr, e->backend_port) < 0 ||
	    (opt && xdp_insert_dsr_opt(ctx, p, e->fe_addr, e->fe_port) < 0)) {
		stat_inc(STAT_DROP_ERROR);
		return XDP_DROP;
	}
	return xdp_transmit(ctx, &fib);
}

static __always_inline int xdp_lb(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct lb_config *cfg = config_get();
	struct ct_entry *e, fresh = {};
	struct lb_svc_val *svc;
	struct lb_backend *be;
	struct pkt p = {};
	__u32 be_id = 0;
	__u64 now;
	int rc;

	if (!cfg || cfg->tunnel_mode != TUNNEL_DISABLED)
		return XDP_PASS;
	if (parse_frame(data, data_end, bpf_xdp_get_buff_len(ctx), &p) != PARSE_OK)
		return XDP_PASS;
	if (xdp_not_to_host(ctx, data))
		return XDP_PASS;              /* not to this host's MAC: tc passes it (and counts it), the kernel drops it */
	if (ip_ttl(data, data_end) <= 1)
		return xdp_to_tc();           /* tc answers time exceeded (or leaves it to the kernel) */
	rc = xdp_snat_reply(ctx, &p, cfg);
	if (rc >= 0)
		return rc;
	if (p.ihl_bytes > sizeof(struct iphdr))
		return XDP_PASS;              /* IP options: DSR requests for this node's pods, and rarities */
	svc = lb_lookup_service(&p);
	if (!svc || (svc->flags & LB_SVC_F_CLUSTER_IP))   /* a ClusterIP is not served from outside */
		return XDP_PASS;
	if (srcrange_denied(&p, svc)) {
		stat_inc(STAT_XDP_DROP_SRC_RANGE);
		return XDP_DROP;
	}
	now = bpf_ktime_get_ns();
	e = bpf_map_lookup_elem(&ct_fwd, &p.t);
	if (e && ct_usable(e, &p, cfg, now) && lb_flow_backend(e)) {
		if (e->flags & CT_F_LOCAL)
			return xdp_to_tc();
		ct_account(e, &p, CT_DIR_FWD, now);
		stat_inc(STAT_FWD_ESTABLISHED);
		return xdp_forward(ctx, &p, e, now);
	}
	if (svc->count == 0)
		return xdp_to_tc();           /* reject or drop: tc answers */
	be = lb_select_backend(&p, svc, &be_id);
	if (!be)
		return xdp_to_tc();           /* nothing chosen, nothing recorded: tc decides */
	if (p.t.proto == IPPROTO_TCP && !(p.tcp_flags & TCPF_SYN) && (!e || !ct_alive(e, IPPROTO_TCP, cfg, now)))
		stat_inc(STAT_CT_NO_STATE);
	if (np_new_flow(ctx, &p, cfg, svc, be_id, be, &fresh, e, now))
		return xdp_to_tc();           /* no port, conntrack full: tc tries once more, then answers */
	stat_inc(STAT_NEW_FLOW);
	if (be->flags & LB_BE_F_LOCAL)
		return xdp_to_tc();           /* tc delivers it to the pod, in the flow recorded here */
	return xdp_forward(ctx, &p, &fresh, now);
}

#endif
