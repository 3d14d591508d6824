/* Every map of the load balancer, pinned by name so all programs and restarts of a node share them. */
#ifndef BPFLB_MAPS_H
#define BPFLB_MAPS_H

#include "common.h"

/* Frontends and their backend slots: {addr, port, proto, slot} -> service or backend id. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct lb_svc_key);
	__type(value, struct lb_svc_val);
	__uint(max_entries, LB_SVC_SLOTS_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_services SEC(".maps");

/* Backends by id: where a flow's packets are sent. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct lb_backend);
	__uint(max_entries, LB_BACKENDS_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_backends SEC(".maps");

/* Flows keyed by the client's tuple as received: which backend, which SNAT port.  A plain hash, not an
 * LRU: a flood of new flows must never evict a live flow's state.  Entries expire by their lifetime
 * (conntrack.h); the datapath reuses dead ones in place and the agent removes them (its conntrack GC),
 * handshake-incomplete ones first when the map fills.  Full: new flows are refused, and counted. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct ct_tuple);
	__type(value, struct ct_entry);
	__uint(max_entries, CT_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ct_fwd SEC(".maps");

/* Flows keyed by the reply's tuple as it leaves the backend: how to translate it back.  For a SNAT'd
 * flow the key holds its port: this entry is the port's reservation (natpool.h).  A hash, as ct_fwd. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct ct_tuple);
	__type(value, struct ct_entry);
	__uint(max_entries, CT_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ct_rev SEC(".maps");

/* The node's runtime settings (mode, SNAT address and port range, timeouts). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct lb_config);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_config SEC(".maps");

/* Per-CPU packet counters by STAT_* reason. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, STAT_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_stats SEC(".maps");

static __always_inline void stat_inc(__u32 reason)
{
	__u64 *v = bpf_map_lookup_elem(&lb_stats, &reason);

	if (v)
		*v += 1;
}

static __always_inline struct lb_config *config_get(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&lb_config, &zero);
}

#endif
