/* The SNAT port pool: a source port for a flow this node SNATs, unique per full tuple (node address and
 * port, backend address and port, protocol), as nf_nat's are.  A flow's reverse entry, keyed by that
 * tuple as the backend's reply carries it, is the port's reservation: inserting it with BPF_NOEXIST is
 * the allocation, so the range serves every backend tuple in full.  A port is given again only once
 * both entries of its old flow are dead, and never while a socket of the node itself uses it towards
 * the same backend (the node's own connections in the other direction: hostnat.h). */
#ifndef BPFLB_NATPOOL_H
#define BPFLB_NATPOOL_H

#include "common.h"
#include "maps.h"
#include "parse.h"
#include "conntrack.h"

#define NATPOOL_SOCKET_ROUNDS 4   /* ports in a row found used by a node socket before giving up */

#define ERR_EEXIST 17
#define ERR_ENOSPC 28

/* One allocation's state, shared with the probing callback of bpf_loop: in a per-CPU scratch entry, not
 * on the stack (a program's frame and the callback's must stay within 512 bytes together).  A program
 * runs to its end on its CPU before another can use the entry. */
struct natpool_probe {
	struct ct_tuple key;          /* the reply tuple of the candidate port */
	struct ct_entry rev;          /* the reverse entry to record (nat_port set per candidate) */
	__u32 span;                   /* ports in the range */
	__u32 min;                    /* first port of the range, host order */
	__u32 start;                  /* a range of at most NAT_PORT_TRIES ports is swept in order from here */
	__s32 result;                 /* 0: key holds the reserved port; -ENOSPC: none found; else the map's error */
	__u32 reused;                 /* the port was taken over from a flow that had ended */
	__u32 index;                  /* the try that found it */
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct natpool_probe);
	__uint(max_entries, 1);
} natpool_scratch SEC(".maps");

/* One candidate (bpf_loop callback: 1 stops the loop): a random port, or in a range no larger than
 * the number of tries the next port of a sweep, so a small range's last free port is always found.
 * A free tuple is reserved at once; one
 * held by a flow whose two entries are both dead is claimed with a compare-and-swap on its timestamp
 * (two CPUs never both take it over) and then replaced whole. */
static long natpool_try(__u32 index, void *unused)
{
	__u32 zero = 0;
	struct natpool_probe *pr = bpf_map_lookup_elem(&natpool_scratch, &zero);
	struct lb_config *cfg = config_get();
	struct ct_entry *old;
	__be16 port;
	__u64 now, seen;
	__u8 proto;
	long rc;

	if (!pr)
		return 1;
	if (!cfg || pr->span == 0) {
		pr->result = -ERR_ENOSPC;
		return 1;
	}
	now = pr->rev.last_seen;
	proto = pr->key.proto;
	if (pr->span <= NAT_PORT_TRIES)
		port = bpf_htons((__u16)(pr->min + (pr->start + index) % pr->span));
	else
		port = bpf_htons((__u16)(pr->min + bpf_get_prandom_u32() % pr->span));
	pr->key.dport = port;
	pr->rev.nat_port = port;
	rc = bpf_map_update_elem(&ct_rev, &pr->key, &pr->rev, BPF_NOEXIST);
	if (rc != -ERR_EEXIST) {
		pr->result = rc;      /* reserved (0), or the map is full (-E2BIG): no other port would do */
		pr->index = index;
		return 1;
	}
	old = bpf_map_lookup_elem(&ct_rev, &pr->key);
	if (!old)
		return 0;
	seen = old->last_seen;
	if (ct_alive(old, proto, cfg, now) || !ct_peer_gone(old, CT_DIR_REV, proto, cfg, now))
		return 0;
	if (__sync_val_compare_and_swap(&old->last_seen, seen, now) != seen)
		return 0;
	if (bpf_map_update_elem(&ct_rev, &pr->key, &pr->rev, BPF_EXIST) != 0)
		return 0;
	pr->result = 0;
	pr->reused = 1;
	pr->index = index;
	return 1;
}

/* Is port free of the node's own sockets towards the backend?  Looked up as the backend's reply would
 * be: a connected socket, a TIME_WAIT, or a listener on the node's address and that port all count. */
static __always_inline int natpool_socket_free(void *ctx, const struct ct_tuple *key)
{
	struct bpf_sock_tuple t = {};
	struct bpf_sock *sk;

	t.ipv4.saddr = key->saddr;
	t.ipv4.daddr = key->daddr;
	t.ipv4.sport = key->sport;
	t.ipv4.dport = key->dport;
	if (key->proto == IPPROTO_TCP)
		sk = bpf_skc_lookup_tcp(ctx, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
	else
		sk = bpf_sk_lookup_udp(ctx, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return 1;
	bpf_sk_release(sk);
	return 0;
}

/* Reserve a port for a flow from rev->nat_addr to rev->backend_addr:backend_port: NAT_PORT_TRIES random
 * ports of the range (Cilium and nf_nat try about as many), the reverse entry recorded for the port
 * found (rev->nat_port).  ctx: the program's context (tc or XDP), for the socket lookup.
 * 0, or -ENOSPC (no port free for this tuple), or the map's error (-E2BIG: conntrack full). */
static __always_inline int natpool_alloc(void *ctx, const struct lb_config *cfg, struct ct_entry *rev, __u8 proto)
{
	__u32 zero = 0;
	struct natpool_probe *pr = bpf_map_lookup_elem(&natpool_scratch, &zero);
	int round;

	if (!pr || cfg->nat_port_min == 0 || cfg->nat_port_max < cfg->nat_port_min)
		return -ERR_ENOSPC;
	pr->rev = *rev;
	pr->span = (__u32)cfg->nat_port_max - cfg->nat_port_min + 1;
	pr->min = cfg->nat_port_min;
	pr->start = bpf_get_prandom_u32();
	pr->reused = 0;
	pr->index = 0;
	ct_reply_tuple(&pr->key, rev->backend_addr, rev->backend_port, rev->nat_addr, 0, proto);
	for (round = 0; round < NATPOOL_SOCKET_ROUNDS; round++) {
		pr->result = -ERR_ENOSPC;
		bpf_loop(NAT_PORT_TRIES, natpool_try, NULL, 0);
		if (pr->result)
			return pr->result;
		if (natpool_socket_free(ctx, &pr->key)) {
			rev->nat_port = pr->rev.nat_port;
			if (pr->reused)
				stat_inc(STAT_NAT_PORT_REUSED);
			return 0;
		}
		/* Ours alone (just reserved, or the dead flow's it replaced): give it back, and go on from the
		 * next port (a sweep must not find this one first again). */
		stat_inc(STAT_NAT_PORT_SOCKET);
		bpf_map_delete_elem(&ct_rev, &pr->key);
		pr->reused = 0;
		pr->start += pr->index + 1;
	}
	return -ERR_ENOSPC;
}

#endif
