/* In-cluster (east-west) Service resolution, shared by the socket LB (sock.h) and the pod-facing tc
 * path (pod.h): a client inside the cluster gets a Service port's internal view (its ClusterIP's
 * backends, internalTrafficPolicy) whichever of the port's frontends it addresses, another node's
 * NodePort included. */
#ifndef BPFLB_EAST_WEST_H
#define BPFLB_EAST_WEST_H

#include "common.h"
#include "maps.h"
#include "nodes.h"

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

/* A frontend's internal view: the ClusterIP frontend of the same Service port (*key becomes it) while it
 * exists, else the frontend itself; NULL when the frontend is not served to in-cluster clients. */
static __always_inline struct lb_svc_val *ew_view(struct lb_svc_key *key, struct lb_svc_val *svc)
{
	struct lb_l4_key fe = { .addr = key->addr, .port = key->port, .proto = key->proto };
	struct lb_svc_key internal = {};
	struct lb_svc_val *isvc;
	struct lb_l4_key *view;

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

/* Another node's NodePort: its address (a node of the cluster, lb_tunnel_map) and a port that is a
 * NodePort on this node's own address.  A NodePort is the same port of the same Service on every node,
 * so the client gets that port's internal view here, as for this node's own NodePort, rather than a trip
 * to that node: Cilium's socket LB does the same, and kube-proxy's rules on that node give a pod the
 * Cluster policy too (its default detect-local mode).  It also keeps DSR from answering a pod on that
 * path from an address it never addressed (the pod itself as backend, or its node's). */
static __always_inline struct lb_svc_val *ew_other_node(struct lb_svc_key *key)
{
	struct lb_config *cfg = config_get();
	struct lb_svc_key own = {};
	struct lb_svc_val *svc;

	if (!cfg || !node_other_addr(key->addr, cfg->snat_addr))
		return NULL;
	own.addr = cfg->snat_addr;
	own.port = key->port;
	own.proto = key->proto;
	svc = bpf_map_lookup_elem(&lb_services, &own);
	if (!svc || !(svc->flags & LB_SVC_F_NODEPORT))
		return NULL;
	*key = own;
	return ew_view(key, svc);
}

/* The master slot an in-cluster client's new flow selects from, or NULL when the destination in *key
 * (slot 0) is no frontend, or one not served to in-cluster clients.  On return *key names that
 * frontend: the destination itself, this node's NodePort for another node's, or the ClusterIP frontend
 * the internal view points to (while that one exists). */
static __always_inline struct lb_svc_val *ew_lookup(struct lb_svc_key *key)
{
	struct lb_svc_val *svc = bpf_map_lookup_elem(&lb_services, key);

	if (!svc)
		return ew_other_node(key);
	if (svc->flags & LB_SVC_F_CLUSTER_IP)
		return svc;
	return ew_view(key, svc);
}

#endif
