/* ICMP errors about translated flows (nf_conntrack's RELATED).  Destination unreachable (fragmentation
 * needed, host or port unreachable, ...) and time exceeded quote the packet that met the error as it
 * was then: after bpflb translated it.  They are translated back here -- the outer destination, the
 * quoted addresses and ports, and every checksum covering them (outer IPv4, ICMP, quoted IPv4, quoted
 * TCP/UDP when present) -- and delivered to whoever sent the original: the client for an error about a
 * request this node SNAT'd, the pod for an error about its reply on its way to the client, the client
 * again for an error this node or its pod raised about a DNAT'd or DSR request.  A flow whose client port
 * was remapped on a clash (conntrack.h's ct_portmap) is quoted with the port each side knows: the client's
 * own towards the client, the remapped one towards the pod.  So path-MTU discovery works through bpflb in
 * every mode. */
#ifndef BPFLB_CT_ICMP_H
#define BPFLB_CT_ICMP_H

#include "common.h"
#include "maps.h"
#include "parse.h"
#include "nat.h"
#include "icmp.h"
#include "fib.h"
#include "conntrack.h"

#define ICMP_TIME_EXCEEDED 11

/* An ICMP error and the start of the packet it quotes. */
struct ct_icmp_err {
	struct iphdr outer;      /* the error's own IPv4 header (first 20 bytes) */
	struct icmphdr icmp;
	struct iphdr quoted;     /* the quoted IPv4 header (first 20 bytes) */
	__be16 ports[4];         /* the quoted L4 header's first 8 bytes: ports, then UDP length/check or TCP seq */
	__u32 icmp_off;          /* offsets in the frame */
	__u32 quoted_l4_off;
	struct ct_tuple q;       /* the quoted packet's tuple */
};

/* Read an ICMP error quoting a whole TCP/UDP header start; 0 when the packet is one. */
static __always_inline int ct_icmp_load(struct __sk_buff *skb, const struct pkt *p, struct ct_icmp_err *err)
{
	err->icmp_off = p->l4_off & 0x7f;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &err->outer, sizeof(err->outer)) < 0 ||
	    bpf_skb_load_bytes(skb, err->icmp_off, &err->icmp, sizeof(err->icmp)) < 0)
		return -1;
	if (err->icmp.type != ICMP_DEST_UNREACH && err->icmp.type != ICMP_TIME_EXCEEDED)
		return -1;
	if (bpf_skb_load_bytes(skb, err->icmp_off + sizeof(err->icmp), &err->quoted, sizeof(err->quoted)) < 0)
		return -1;
	if (err->quoted.version != 4 || err->quoted.ihl < 5 || (err->quoted.frag_off & bpf_htons(IP_OFFSET)) ||
	    (err->quoted.protocol != IPPROTO_TCP && err->quoted.protocol != IPPROTO_UDP))
		return -1;
	err->quoted_l4_off = err->icmp_off + sizeof(err->icmp) + err->quoted.ihl * 4;
	if (bpf_skb_load_bytes(skb, err->quoted_l4_off & 0xff, err->ports, sizeof(err->ports)) < 0)
		return -1;
	err->q.saddr = err->quoted.saddr;
	err->q.daddr = err->quoted.daddr;
	err->q.sport = err->ports[0];
	err->q.dport = err->ports[1];
	err->q.proto = err->quoted.protocol;
	err->q.pad[0] = err->q.pad[1] = err->q.pad[2] = 0;
	return 0;
}

/* The checksum difference of one 16-bit field going from old to new. */
static __always_inline __u32 csum_diff16(__u32 diff, __u16 old, __u16 new)
{
	diff = csum_add32(diff, (__u16)~old);
	return csum_add32(diff, new);
}

/* Rewrite the error: outer addresses (osrc -> odst), quoted tuple (qs:qsp -> qd:qdp).  ICMP carries no
 * pseudo-header, so the outer rewrite touches only the outer IPv4 checksum; every quoted change is
 * also folded into the ICMP checksum.  0 on success. */
static __always_inline int ct_icmp_rewrite(struct __sk_buff *skb, struct ct_icmp_err *err, __be32 osrc, __be32 odst,
					   __be32 qs, __be16 qsp, __be32 qd, __be16 qdp)
{
	__u32 d_addr = 0, d_l4 = 0, d_icmp = 0, d_out = 0, old_w, new_w, off;
	__u16 old_check, l4check;
	int have_l4check = 0;

	d_addr = csum_add32(d_addr, ~err->quoted.saddr);
	d_addr = csum_add32(d_addr, qs);
	d_addr = csum_add32(d_addr, ~err->quoted.daddr);
	d_addr = csum_add32(d_addr, qd);
	__builtin_memcpy(&old_w, err->ports, sizeof(old_w));
	err->ports[0] = qsp;
	err->ports[1] = qdp;
	__builtin_memcpy(&new_w, err->ports, sizeof(new_w));
	d_l4 = csum_add32(csum_add32(d_addr, ~old_w), new_w);     /* pseudo-header addresses and ports */
	d_icmp = csum_add32(csum_add32(d_addr, ~old_w), new_w);

	err->quoted.saddr = qs;
	err->quoted.daddr = qd;
	old_check = err->quoted.check;
	err->quoted.check = csum_apply(old_check, d_addr);
	d_icmp = csum_diff16(d_icmp, old_check, err->quoted.check);

	/* The quoted L4 checksum, when the quote holds it (UDP: always; TCP: bytes 16-17, if quoted). */
	if (err->quoted.protocol == IPPROTO_UDP) {
		old_check = err->ports[3];
		if (old_check) {
			err->ports[3] = csum_apply(old_check, d_l4);
			if (!err->ports[3])
				err->ports[3] = 0xffff;
			d_icmp = csum_diff16(d_icmp, old_check, err->ports[3]);
		}
	} else {
		off = (err->quoted_l4_off & 0xff) + 16;
		if (off + sizeof(l4check) <= skb->len && bpf_skb_load_bytes(skb, off, &l4check, sizeof(l4check)) == 0) {
			old_check = l4check;
			l4check = csum_apply(old_check, d_l4);
			d_icmp = csum_diff16(d_icmp, old_check, l4check);
			have_l4check = 1;
		}
	}
	err->icmp.checksum = csum_apply(err->icmp.checksum, d_icmp);

	d_out = csum_add32(d_out, ~err->outer.saddr);
	d_out = csum_add32(d_out, osrc);
	d_out = csum_add32(d_out, ~err->outer.daddr);
	d_out = csum_add32(d_out, odst);
	err->outer.saddr = osrc;
	err->outer.daddr = odst;
	err->outer.check = csum_apply(err->outer.check, d_out);

	if (bpf_skb_store_bytes(skb, ETH_HLEN, &err->outer, sizeof(err->outer), 0) < 0 ||
	    bpf_skb_store_bytes(skb, err->icmp_off, &err->icmp, sizeof(err->icmp), 0) < 0 ||
	    bpf_skb_store_bytes(skb, err->icmp_off + sizeof(err->icmp), &err->quoted, sizeof(err->quoted), 0) < 0 ||
	    bpf_skb_store_bytes(skb, err->quoted_l4_off & 0xff, err->ports, sizeof(err->ports), 0) < 0)
		return -1;
	if (have_l4check && bpf_skb_store_bytes(skb, (err->quoted_l4_off & 0xff) + 16, &l4check, sizeof(l4check), 0) < 0)
		return -1;
	stat_inc(STAT_ICMP_RELATED);
	return 0;
}

/* tc ingress: an ICMP error arriving at the node.  Returns a verdict, or -1 when it is about no flow of
 * this node (it goes on to the stack untouched). */
static __always_inline int ct_icmp_ingress(struct __sk_buff *skb, const struct pkt *p, const struct lb_config *cfg)
{
	struct ct_icmp_err err;
	struct ct_tuple key;
	struct ct_entry *e;
	__be32 osrc;

	if (ct_icmp_load(skb, p, &err) < 0)
		return -1;
	/* About a request this node SNAT'd (or a node connection it moved): the quote is what left here. */
	if (err.q.saddr == cfg->snat_addr) {
		ct_reply_tuple(&key, err.q.daddr, err.q.dport, err.q.saddr, err.q.sport, err.q.proto);
		e = bpf_map_lookup_elem(&ct_rev, &key);
		if (e && (e->flags & CT_F_SNAT)) {
			/* An error the backend raised itself names the frontend, never the pod. */
			osrc = err.outer.saddr == e->backend_addr ? e->fe_addr : err.outer.saddr;
			if (ct_icmp_rewrite(skb, &err, osrc, e->client_addr, e->client_addr, e->client_port,
					    e->fe_addr, e->fe_port) < 0)
				return TC_ACT_SHOT;
			if (e->flags & CT_F_HOST)
				return TC_ACT_OK;
			return fib_forward(skb, osrc, e->client_addr, IPPROTO_ICMP, 0);
		}
	}
	/* About a reply on its way to the client (SNAT, local backend, or a DSR pod's reply sent from the
	 * frontend): the quote is frontend -> client, the client's flow says which backend sent it. */
	ct_reply_tuple(&key, err.q.daddr, err.q.dport, err.q.saddr, err.q.sport, err.q.proto);
	e = bpf_map_lookup_elem(&ct_fwd, &key);
	if (!e || (e->flags & CT_F_HOST))
		return -1;
	/* The pod sent its reply to the flow's SNAT address, or to the client port remapped on a clash
	 * (CT_F_PORTMAP, nat_addr the client's: a local flow, or a DSR flow's mapping on its backend's node). */
	if (ct_icmp_rewrite(skb, &err, err.outer.saddr, e->backend_addr, e->backend_addr, e->backend_port,
			    (e->flags & (CT_F_SNAT | CT_F_PORTMAP)) ? e->nat_addr : e->client_addr,
			    (e->flags & (CT_F_SNAT | CT_F_PORTMAP)) ? e->nat_port : e->client_port) < 0)
		return TC_ACT_SHOT;
	return fib_forward(skb, err.outer.saddr, e->backend_addr, IPPROTO_ICMP, 0);
}

/* tc egress: an ICMP error leaving the node about a request it DNAT'd to one of its pods (local
 * backend, or a DSR request it accepted): raised by the node's stack on the way to the pod, or by the
 * pod.  The client must see it about the frontend it used.  Returns a verdict, or -1. */
static __always_inline int ct_icmp_egress(struct __sk_buff *skb, const struct pkt *p)
{
	struct ct_icmp_err err;
	struct ct_tuple key;
	struct ct_entry *e;

	if (ct_icmp_load(skb, p, &err) < 0)
		return -1;
	ct_reply_tuple(&key, err.q.daddr, err.q.dport, err.q.saddr, err.q.sport, err.q.proto);
	e = bpf_map_lookup_elem(&ct_rev, &key);
	if (!e || !(e->flags & (CT_F_LOCAL | CT_F_DSR)))
		return -1;
	/* A request delivered from a remapped client port (CT_F_PORTMAP) is quoted with the client's own. */
	if (ct_icmp_rewrite(skb, &err, err.outer.saddr == e->backend_addr ? e->fe_addr : err.outer.saddr,
			    err.outer.daddr, err.q.saddr, (e->flags & CT_F_PORTMAP) ? e->client_port : err.q.sport,
			    e->fe_addr, e->fe_port) < 0)
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

#endif
