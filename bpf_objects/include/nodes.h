/* The cluster's nodes as the datapath knows them: every node's address and pod CIDRs -> that node's
 * address (the agent writes it from the Node objects, whatever the tunnelMode).  The VXLAN overlay reads
 * it for the node behind a backend (tunnel.h); the in-cluster paths for whether an address is another
 * node's (east_west.h). */
#ifndef BPFLB_NODES_H
#define BPFLB_NODES_H

#include "common.h"
#include "lb_structs.h"

/* Cluster prefixes (pod CIDRs, node addresses /32) -> the underlay address of the node holding them. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct lb_cidr_key);
	__type(value, struct lb_tunnel_ep);
	__uint(max_entries, 4096);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_tunnel_map SEC(".maps");

/* The node at the other end of the tunnel for a cluster address, or NULL. */
static __always_inline struct lb_tunnel_ep *tunnel_endpoint(__be32 addr)
{
	struct lb_cidr_key key = { .prefixlen = 32, .addr = addr };

	return bpf_map_lookup_elem(&lb_tunnel_map, &key);
}

/* Is addr another node's own address (not an address in its pod CIDR, not this node's)? */
static __always_inline int node_other_addr(__be32 addr, __be32 self)
{
	struct lb_tunnel_ep *ep;

	if (addr == self)
		return 0;
	ep = tunnel_endpoint(addr);
	return ep && ep->node_addr == addr;
}

#endif
