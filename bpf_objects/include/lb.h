/* Service lookup and backend selection: session affinity first, then Maglev or a random slot. */
#ifndef BPFLB_LB_H
#define BPFLB_LB_H

#include "common.h"
#include "maps.h"
#include "parse.h"
#include "maglev.h"
#include "affinity.h"

/* The frontend's master slot for the packet's destination, or NULL when it is not a frontend. */
static __always_inline struct lb_svc_val *lb_lookup_service(const struct pkt *p)
{
	struct lb_svc_key key = {
		.addr = p->t.daddr,
		.port = p->t.dport,
		.slot = 0,
		.proto = p->t.proto,
	};

	return bpf_map_lookup_elem(&lb_services, &key);
}

/* Pick a backend for a new flow; returns its id through *id, or NULL when none is usable.
 * Order: the client's session affinity (when the frontend has a timeout and the remembered
 * backend is still eligible), else the frontend's algorithm: its Maglev table entry for the
 * flow's hash, or a random slot (also the fallback while a Maglev table is missing).  Only
 * slots 1..count are ever chosen, and they name only backends eligible for new flows:
 * terminating ones stay in lb_backends for their open flows but are in no slot. */
static __always_inline struct lb_backend *lb_select_backend(const struct pkt *p, const struct lb_svc_val *svc,
							     __u32 *id)
{
	struct lb_svc_key key = {
		.addr = p->t.daddr,
		.port = p->t.dport,
		.proto = p->t.proto,
	};
	struct lb_backend *be;
	struct lb_svc_val *slot;
	__u64 now = 0;
	__u32 pick = 0;

	if (svc->count == 0)
		return NULL;
	if (svc->affinity_timeout) {
		now = bpf_ktime_get_ns();
		pick = affinity_lookup(p, svc, now);
		if (pick) {
			be = bpf_map_lookup_elem(&lb_backends, &pick);
			if (be) {
				*id = pick;
				return be;
			}
		}
	}
	if (svc->algorithm == LB_ALG_MAGLEV)
		key.slot = maglev_select_slot(p, svc);
	if (key.slot == 0)
		key.slot = (bpf_get_prandom_u32() % svc->count) + 1;
	slot = bpf_map_lookup_elem(&lb_services, &key);
	if (!slot)
		return NULL;
	*id = slot->id;
	be = bpf_map_lookup_elem(&lb_backends, id);
	if (be && svc->affinity_timeout)
		affinity_record(p, svc, *id, now);
	return be;
}

/* The backend an existing flow uses, if it still exists where the flow left it. */
static __always_inline struct lb_backend *lb_flow_backend(const struct ct_entry *e)
{
	__u32 id = e->backend_id;
	struct lb_backend *be = bpf_map_lookup_elem(&lb_backends, &id);

	if (!be || be->addr != e->backend_addr || be->port != e->backend_port)
		return NULL;
	return be;
}

#endif
