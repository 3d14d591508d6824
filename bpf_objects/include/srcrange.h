/* loadBalancerSourceRanges (svcSourceRangeCheck): which clients may reach a frontend.  A frontend whose
 * master slot carries LB_SVC_F_SRC_RANGE admits a packet only when its source is in one of the frontend's
 * prefixes in lb_src_ranges (an LPM trie keyed by the frontend's service id and the prefix, as Cilium's
 * LB4_SRC_RANGE_MAP); with LB_SVC_F_SRC_RANGE_DENY as well the prefixes are a deny list instead.  The
 * check runs on every packet of a flow, not only the first, so narrowed ranges also cut open flows. */
#ifndef BPFLB_SRCRANGE_H
#define BPFLB_SRCRANGE_H

#include "common.h"
#include "maps.h"
#include "parse.h"

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct lb_src_range_key);
	__type(value, __u8);
	__uint(max_entries, LB_SRC_RANGES_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_src_ranges SEC(".maps");

/* 1 when the frontend's source ranges refuse the packet's client (counted as STAT_DROP_SRC_RANGE: the
 * caller drops it, as kube-proxy does), 0 when it may pass or the frontend has no ranges. */
static __always_inline int srcrange_denied(const struct pkt *p, const struct lb_svc_val *svc)
{
	struct lb_src_range_key key = {
		.prefixlen = 64,
		.svc_id = svc->id,
		.addr = p->t.saddr,
	};
	int listed, deny;

	if (!(svc->flags & LB_SVC_F_SRC_RANGE))
		return 0;
	listed = bpf_map_lookup_elem(&lb_src_ranges, &key) != NULL;
	deny = !!(svc->flags & LB_SVC_F_SRC_RANGE_DENY);
	if (listed != deny)
		return 0;
	stat_inc(STAT_DROP_SRC_RANGE);
	return 1;
}

#endif
