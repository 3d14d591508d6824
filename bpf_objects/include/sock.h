/* Socket-level load balancing (cgroup v2 sock_addr hooks): a connect() (TCP, UDP) or an unconnected UDP
 * sendmsg() to a Service frontend goes straight to a backend before any packet exists, so the wire and
 * the node's conntrack only ever see pod-to-pod traffic; the application keeps seeing the Service
 * address (recvmsg4 for UDP replies, getpeername4).
 *
 * Selection has no source address or port to hash yet (slots hold only backends eligible for new
 * flows, as for packets): a TCP connect() draws at random (a Maglev frontend's table is read at a random
 * entry: the connection keeps its backend for its life, and no other node needs to agree on it), a UDP
 * socket hashes its cookie, so an unconnected socket keeps one backend from datagram to datagram as
 * kube-proxy's conntrack entry would (through the Maglev table for Maglev frontends: a backend change
 * then moves only the sockets of the backend that changed).  Session affinity is per client network
 * namespace (a pod).  A Service without endpoints refuses the call with ECONNREFUSED (kube-proxy's
 * REJECT); one with endpoints but none on this node (internalTrafficPolicy Local) with EHOSTUNREACH,
 * where kube-proxy drops and the client times out. */
#ifndef BPFLB_SOCK_H
#define BPFLB_SOCK_H

#include "common.h"
#include "maps.h"
#include "lb.h"
#include "east_west.h"

#define SYS_REJECT 0
#define SYS_PROCEED 1
#define SOCK_ECONNREFUSED 111
#define SOCK_EHOSTUNREACH 113

/* Translated sockets: {socket, backend} -> the Service address the application addressed. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct lb_sock_rev_key);
	__type(value, struct lb_sock_rev_val);
	__uint(max_entries, LB_SOCK_REV_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_sock_rev SEC(".maps");

/* sessionAffinity ClientIP of socket clients: {network namespace, frontend} -> backend, last used. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct lb_sock_affinity_key);
	__type(value, struct lb_affinity_val);
	__uint(max_entries, LB_SOCK_AFFINITY_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_sock_affinity SEC(".maps");

/* IPPROTO_TCP or IPPROTO_UDP for the socket, 0 for anything else (raw, ICMP "ping" sockets, SCTP). */
static __always_inline __u8 sock_proto(const struct bpf_sock_addr *ctx)
{
	__u32 proto = ctx->protocol;

	return proto == IPPROTO_TCP || proto == IPPROTO_UDP ? proto : 0;
}

/* The backend id the namespace's affinity still names for the frontend, or 0 (none, expired, or no
 * longer eligible); a hit counts as use.  affinity.h's rules, keyed by namespace instead of address. */
static __always_inline __u32 sock_affinity_lookup(__u64 netns, const struct lb_svc_val *svc, __u64 now)
{
	struct lb_sock_affinity_key key = { .netns_cookie = netns, .svc_id = svc->id };
	struct lb_affinity_member member = { .svc_id = svc->id };
	struct lb_affinity_val *val;

	val = bpf_map_lookup_elem(&lb_sock_affinity, &key);
	if (!val || now - val->last_used > (__u64)svc->affinity_timeout * NSEC_PER_SEC)
		return 0;
	member.backend_id = val->backend_id;
	if (!bpf_map_lookup_elem(&lb_affinity_members, &member))
		return 0;
	val->last_used = now;
	return member.backend_id;
}

static __always_inline void sock_affinity_record(__u64 netns, const struct lb_svc_val *svc, __u32 backend_id,
						 __u64 now)
{
	struct lb_sock_affinity_key key = { .netns_cookie = netns, .svc_id = svc->id };
	struct lb_affinity_val val = { .last_used = now, .backend_id = backend_id };

	bpf_map_update_elem(&lb_sock_affinity, &key, &val, BPF_ANY);
}

/* A backend for a new socket to the frontend *key names (svc: its master slot), its id in *id.  The
 * socket's own affinity first; then a Maglev frontend's table entry for a pseudo-flow (lb.h hashes it
 * like a packet: TCP a random source address, UDP the socket cookie as source address, low 32 bits,
 * and port, next 16), or a Random frontend's slot number: TCP at random, UDP from the cookie's hash. */
static __always_inline struct lb_backend *sock_select(const struct bpf_sock_addr *ctx, const struct lb_svc_key *key,
						       const struct lb_svc_val *svc, __u8 proto, __u64 cookie, __u32 *id)
{
	struct lb_svc_key skey = *key;
	struct lb_backend *be = NULL;
	struct lb_svc_val *slot;
	__u64 netns = 0, now = 0;

	if (svc->affinity_timeout) {
		netns = bpf_get_netns_cookie((void *)ctx);
		now = bpf_ktime_get_ns();
		*id = sock_affinity_lookup(netns, svc, now);
		if (*id)
			be = bpf_map_lookup_elem(&lb_backends, id);
		if (be)
			return be;
	}
	if (svc->algorithm == LB_ALG_MAGLEV) {
		struct lb_svc_val sel = *svc;
		struct pkt flow = {};

		flow.t.saddr = proto == IPPROTO_TCP ? bpf_get_prandom_u32() : bpf_htonl((__u32)cookie);
		flow.t.sport = proto == IPPROTO_TCP ? 0 : bpf_htons((__u16)(cookie >> 32));
		flow.t.daddr = key->addr;
		flow.t.dport = key->port;
		flow.t.proto = proto;
		sel.affinity_timeout = 0;
		be = lb_select_backend(&flow, &sel, id);
	} else {
		__u32 hash = proto == IPPROTO_TCP ? bpf_get_prandom_u32() :
			     maglev_jhash_3words((__u32)cookie, (__u32)(cookie >> 32), proto, 0);

		skey.slot = (hash % svc->count) + 1;
		slot = bpf_map_lookup_elem(&lb_services, &skey);
		if (!slot)
			return NULL;
		*id = slot->id;
		be = bpf_map_lookup_elem(&lb_backends, id);
	}
	if (be && svc->affinity_timeout)
		sock_affinity_record(netns, svc, *id, now);
	return be;
}

/* connect4 / sendmsg4: send the socket to a backend of the frontend it addresses.  SYS_PROCEED when
 * translated or not addressed to a frontend; SYS_REJECT with the call's errno set otherwise. */
static __always_inline int sock_xlate_fwd(struct bpf_sock_addr *ctx, __u32 stat)
{
	struct lb_svc_key key = {};
	struct lb_sock_rev_key rkey = {};
	struct lb_sock_rev_val rval = {};
	struct lb_svc_val *svc;
	struct lb_backend *be;
	__u8 proto = sock_proto(ctx);
	__u32 id = 0;
	__u64 cookie;

	if (!proto)
		return SYS_PROCEED;
	key.addr = ctx->user_ip4;
	key.port = (__u16)ctx->user_port;
	key.proto = proto;
	rval.addr = key.addr;
	rval.port = key.port;
	svc = ew_lookup(&key);
	if (!svc)
		return SYS_PROCEED;
	if (svc->count == 0) {
		stat_inc(STAT_SOCK_REJECT);
		bpf_set_retval(svc->flags & LB_SVC_F_NO_ENDPOINTS ? -SOCK_ECONNREFUSED : -SOCK_EHOSTUNREACH);
		return SYS_REJECT;
	}
	cookie = bpf_get_socket_cookie(ctx);
	be = sock_select(ctx, &key, svc, proto, cookie, &id);
	if (!be) {
		stat_inc(STAT_DROP_NO_BACKEND);
		bpf_set_retval(-SOCK_EHOSTUNREACH);
		return SYS_REJECT;
	}
	rkey.cookie = cookie;
	rkey.addr = be->addr;
	rkey.port = be->port;
	rkey.proto = proto;
	/* Rewritten only when it differs: the sendmsg of every datagram comes here. */
	{
		struct lb_sock_rev_val *old = bpf_map_lookup_elem(&lb_sock_rev, &rkey);

		if ((!old || old->addr != rval.addr || old->port != rval.port) &&
		    bpf_map_update_elem(&lb_sock_rev, &rkey, &rval, BPF_ANY) < 0)
			stat_inc(STAT_SOCK_REVNAT_FAILED);   /* still sent: only the reply's source is affected */
	}
	ctx->user_ip4 = be->addr;
	ctx->user_port = be->port;
	stat_inc(stat);
	return SYS_PROCEED;
}

/* recvmsg4 / getpeername4: show the Service address the socket was sent to instead of its backend.
 * These hooks cannot refuse: always SYS_PROCEED. */
static __always_inline int sock_xlate_rev(struct bpf_sock_addr *ctx)
{
	struct lb_sock_rev_key rkey = {};
	struct lb_sock_rev_val *rval;
	__u8 proto = sock_proto(ctx);

	if (!proto)
		return SYS_PROCEED;
	rkey.cookie = bpf_get_socket_cookie(ctx);
	rkey.addr = ctx->user_ip4;
	rkey.port = (__u16)ctx->user_port;
	rkey.proto = proto;
	rval = bpf_map_lookup_elem(&lb_sock_rev, &rkey);
	if (!rval)
		return SYS_PROCEED;
	ctx->user_ip4 = rval->addr;
	ctx->user_port = rval->port;
	stat_inc(STAT_SOCK_REVERSE);
	return SYS_PROCEED;
}

#endif
