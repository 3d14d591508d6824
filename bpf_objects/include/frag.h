/* IP fragments of translated flows: a fragmented datagram is translated whole, every fragment like the
 * first.  Only the first fragment (offset 0, MF) carries the L4 header: when the datapath translates it
 * (nat.h's nat_rewrite; a DSR request accepted, a reply sent into the overlay), its ports are recorded
 * under the datagram's reassembly key (source, destination, IP id, protocol), and each later fragment
 * that finds the record goes through the flow path with those ports, as a packet of that flow: the same
 * flow entry, the same address rewrite (the IPv4 header alone: the L4 checksum, covering the whole
 * datagram, sits in the first fragment and was updated there), the same way out.  A later fragment
 * without a record (its first one not ours, not seen yet, or its record gone) passes untouched as
 * before, and never starts a flow.  Nothing is reassembled or held back: a later fragment that arrives
 * before its first one is not translated (the datagram is lost, as it would be behind any stateless
 * middlebox).  The records live in an LRU map of their own, so a flood of first fragments only pushes
 * out other fragment records, never a flow's state; a record is used at most LB_FRAG_LIFETIME_S after
 * its first fragment, so a later datagram reusing the IP id is never taken for it. */
#ifndef BPFLB_FRAG_H
#define BPFLB_FRAG_H

#include "common.h"
#include "maps.h"
#include "parse.h"

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct lb_frag_key);
	__type(value, struct lb_frag_val);
	__uint(max_entries, LB_FRAG_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_frags SEC(".maps");

static __always_inline void frag_key(struct lb_frag_key *k, const struct pkt *p)
{
	k->saddr = p->t.saddr;
	k->daddr = p->t.daddr;
	k->id = p->ip_id;
	k->proto = p->t.proto;
	k->pad = 0;
}

/* A later fragment: the ports of its datagram's first fragment, when that one was translated here
 * lately.  1 when found (p's ports set), else 0. */
static __attribute__((noinline)) int frag_follow(struct pkt *p)
{
	struct lb_frag_key k;
	struct lb_frag_val *v;
	__u64 now;

	frag_key(&k, p);
	v = bpf_map_lookup_elem(&lb_frags, &k);
	if (!v)
		return 0;
	now = bpf_ktime_get_ns();
	if (now > v->created && now - v->created > (__u64)LB_FRAG_LIFETIME_S * NSEC_PER_SEC)
		return 0;
	p->t.sport = v->sport;
	p->t.dport = v->dport;
	stat_inc(STAT_FRAG_FOLLOWED);
	return 1;
}

/* parse_pkt for the tc programs that follow fragments: a first fragment with its L4 header, and a later
 * one whose first fragment was translated, come back PARSE_OK (pkt.frag says which), to go the way of
 * their flow; any other fragment stays PARSE_FRAGMENT. */
static __always_inline enum parse_result frag_parse_pkt(struct __sk_buff *skb, struct pkt *p)
{
	enum parse_result r = parse_pkt(skb, p);

	if (r != PARSE_FRAGMENT)
		return r;
	if (p->frag == PKT_FRAG_FIRST || (p->frag == PKT_FRAG_LATER && frag_follow(p)))
		return PARSE_OK;
	return PARSE_FRAGMENT;
}

/* A first fragment was translated (or otherwise taken by a flow): record its ports for the rest of the
 * datagram.  A no-op for anything else. */
static __always_inline void frag_record(const struct pkt *p)
{
	struct lb_frag_key k;
	struct lb_frag_val v = {};

	if (p->frag != PKT_FRAG_FIRST)
		return;
	frag_key(&k, p);
	v.created = bpf_ktime_get_ns();
	v.sport = p->t.sport;
	v.dport = p->t.dport;
	if (bpf_map_update_elem(&lb_frags, &k, &v, BPF_ANY) < 0)
		stat_inc(STAT_FRAG_TRACK_FAILED);
	else
		stat_inc(STAT_FRAG_TRACKED);
}

/* Never a new flow from a later fragment: its flow ended since its first fragment (the first fragment
 * started one, or found one, moments ago).  1 when p is a later fragment. */
static __always_inline int frag_later(const struct pkt *p)
{
	return p->frag == PKT_FRAG_LATER;
}

#endif
