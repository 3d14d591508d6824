/* sessionAffinity: ClientIP: a client's new flows to a frontend keep the backend its last one got,
 * until the frontend's timeout passes without a new flow from that client. */
#ifndef BPFLB_AFFINITY_H
#define BPFLB_AFFINITY_H

#include "common.h"
#include "parse.h"

/* The backend each (frontend, client address) last got, and when (LRU: idle clients age out). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct lb_affinity_key);
	__type(value, struct lb_affinity_val);
	__uint(max_entries, LB_AFFINITY_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_affinity SEC(".maps");

/* {frontend, backend} pairs eligible for new flows, for frontends with affinity only: a remembered
 * backend that became terminating or left the Service is not reused even though it still exists. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct lb_affinity_member);
	__type(value, __u32);
	__uint(max_entries, LB_AFFINITY_MEMBERS_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_affinity_members SEC(".maps");

/* The backend id the client's affinity still names for this frontend, or 0 (none, expired, or no
 * longer eligible).  A hit refreshes the entry's time: the timeout counts from the last new flow. */
static __always_inline __u32 affinity_lookup(const struct pkt *p, const struct lb_svc_val *svc, __u64 now)
{
	struct lb_affinity_key key = { .svc_id = svc->id, .client_addr = p->t.saddr };
	struct lb_affinity_member member = { .svc_id = svc->id };
	struct lb_affinity_val *val;

	val = bpf_map_lookup_elem(&lb_affinity, &key);
	if (!val)
		return 0;
	if (now - val->last_used > (__u64)svc->affinity_timeout * NSEC_PER_SEC)
		return 0;
	member.backend_id = val->backend_id;
	if (!bpf_map_lookup_elem(&lb_affinity_members, &member))
		return 0;
	val->last_used = now;
	return member.backend_id;
}

/* Remember the backend a client's new flow got. */
static __always_inline void affinity_record(const struct pkt *p, const struct lb_svc_val *svc, __u32 backend_id,
					    __u64 now)
{
	struct lb_affinity_key key = { .svc_id = svc->id, .client_addr = p->t.saddr };
	struct lb_affinity_val val = { .last_used = now, .backend_id = backend_id };

	bpf_map_update_elem(&lb_affinity, &key, &val, BPF_ANY);
}

#endif
