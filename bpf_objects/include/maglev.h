/* Maglev consistent hashing: the packet hash and the per-frontend lookup table (built by the agent). */
#ifndef BPFLB_MAGLEV_H
#define BPFLB_MAGLEV_H

#include "common.h"
#include "parse.h"

/* Maglev tables by {frontend's service id, block}: LB_MAGLEV_BLOCK slot numbers per entry.  A hash
 * map, not a map-in-map: replacing a table is plain element updates, no synchronize_rcu per table. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct lb_maglev_key);
	__type(value, struct lb_maglev_block);
	__uint(max_entries, LB_MAGLEV_BLOCKS_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_maglev SEC(".maps");

/* The cluster-wide table size M and packet-hash seed (one entry). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct lb_maglev_config);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_maglev_cfg SEC(".maps");

/* Linux's jhash_3words (include/linux/jhash.h), so the hash is the one the kernel documents;
 * bpflb.model.maglev.packet_hash computes the same value in Python. */
#define MAGLEV_JHASH_INITVAL 0xdeadbeef
#define maglev_rol32(v, s) (((v) << (s)) | ((v) >> (32 - (s))))

static __always_inline __u32 maglev_jhash_3words(__u32 a, __u32 b, __u32 c, __u32 initval)
{
	initval += MAGLEV_JHASH_INITVAL + (3 << 2);
	a += initval;
	b += initval;
	c += initval;
	c ^= b; c -= maglev_rol32(b, 14);
	a ^= c; a -= maglev_rol32(c, 11);
	b ^= a; b -= maglev_rol32(a, 25);
	c ^= b; c -= maglev_rol32(b, 16);
	a ^= c; a -= maglev_rol32(c, 4);
	b ^= a; b -= maglev_rol32(a, 14);
	c ^= b; c -= maglev_rol32(b, 24);
	return c;
}

/* The flow's hash: client address, client port, frontend port and protocol, in host order.  The
 * frontend address is left out on purpose: node1:30080 and node2:30080 must pick the same backend. */
static __always_inline __u32 maglev_packet_hash(const struct pkt *p, __u32 seed)
{
	__u32 ports = ((__u32)bpf_ntohs(p->t.sport) << 16) | bpf_ntohs(p->t.dport);

	return maglev_jhash_3words(bpf_ntohl(p->t.saddr), ports, p->t.proto, seed);
}

/* The frontend slot the Maglev table gives this flow, or 0 when there is no usable table entry
 * (no table yet, M unset, or an entry beyond the frontend's count while a table is replaced):
 * the caller then falls back to a random slot. */
static __always_inline __u32 maglev_select_slot(const struct pkt *p, const struct lb_svc_val *svc)
{
	struct lb_maglev_key key = { .svc_id = svc->id };
	struct lb_maglev_config *cfg;
	struct lb_maglev_block *blk;
	__u32 zero = 0, idx, slot;

	cfg = bpf_map_lookup_elem(&lb_maglev_cfg, &zero);
	if (!cfg || cfg->table_size == 0 || cfg->table_size > LB_MAGLEV_M_MAX)
		return 0;
	idx = maglev_packet_hash(p, cfg->hash_seed) % cfg->table_size;
	key.block = idx >> LB_MAGLEV_BLOCK_SHIFT;
	blk = bpf_map_lookup_elem(&lb_maglev, &key);
	if (!blk)
		return 0;
	slot = blk->slot[idx & (LB_MAGLEV_BLOCK - 1)];
	return slot <= svc->count ? slot : 0;
}

#endif
