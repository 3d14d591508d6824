/* Service lookup and backend selection (the step Maglev and affinity plug into). */
#ifndef BPFLB_LB_H
#define BPFLB_LB_H

#include "common.h"
#include "maps.h"
#include "parse.h"

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

/* Pick a backend for a new flow; returns its id through *id, or NULL when none is usable. */
static __always_inline struct lb_backend *lb_select_backend(const struct pkt *p, const struct lb_svc_val *svc,
							     __u32 *id)
{
	struct lb_svc_key key = {
		.addr = p->t.daddr,
		.port = p->t.dport,
		.proto = p->t.proto,
	};
	struct lb_svc_val *slot;

	if (svc->count == 0)
		return NULL;
	key.slot = (bpf_get_prandom_u32() % svc->count) + 1;
	slot = bpf_map_lookup_elem(&lb_services, &key);
	if (!slot)
		return NULL;
	*id = slot->id;
	return bpf_map_lookup_elem(&lb_backends, id);
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
