/* In-cluster (east-west) Service resolution, shared by the socket LB (sock.h) and the pod-facing tc
 * path (pod.h): a client inside the cluster gets a Service port's internal view (its ClusterIP's
 * backends, internalTrafficPolicy) whichever of the port's frontends it addresses. */
#ifndef BPFLB_EAST_WEST_H
#define BPFLB_EAST_WEST_H

#include "common.h"
#include "maps.h"

/* A NodePort, LoadBalancer IP or externalIP frontend -> the ClusterIP frontend of the same Service port,
 * whose backends in-cluster clients get (Cilium's internal scope of a two-scope service).  No entry: the
 * port has no ClusterIP frontend on this node, and in-cluster clients get the frontend's own backends.
 * An all-zero value: the frontend is not served to in-cluster clients at all (an externalIP that is not
 * this node's own address: in-cluster traffic to it goes to that address, as with Cilium; translating it
 * would let any Service capture the cluster's traffic to any address, CVE-2020-8554). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct lb_l4_key);
	__type(value, struct lb_l4_key);
	__uint(max_entries, LB_SERVICES_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_internal_view SEC(".maps");

/* The master slot an in-cluster client's new flow selects from, or NULL when the destination in *key
 * (slot 0) is no frontend, or one not served to in-cluster clients.  On return *key names that frontend: the destination itself, or the
 * ClusterIP frontend its internal view points to (while that one exists). */
static __always_inline struct lb_svc_val *ew_lookup(struct lb_svc_key *key)
{
	struct lb_l4_key fe = { .addr = key->addr, .port = key->port, .proto = key->proto };
	struct lb_svc_key internal = {};
	struct lb_svc_val *svc, *isvc;
	struct lb_l4_key *view;

	svc = bpf_map_lookup_elem(&lb_services, key);
	if (!svc || (svc->flags & LB_SVC_F_CLUSTER_IP))
		return svc;
	view = bpf_map_lookup_elem(&lb_internal_view, &fe);
	if (!view)
		return svc;
	if (!view->addr && !view->port)
		return NULL;
	internal.addr = view->addr;
	internal.port = view->port;
	internal.proto = view->proto;
	isvc = bpf_map_lookup_elem(&lb_services, &internal);
	if (!isvc)
		return svc;
	*key = internal;
	return isvc;
}

#endif
