/* Includes, constants and small helpers every bpflb BPF object shares. */
#ifndef BPFLB_COMMON_H
#define BPFLB_COMMON_H

#include <linux/types.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "lb_structs.h"

#define NSEC_PER_SEC 1000000000ULL

#ifndef AF_INET
#define AF_INET 2
#endif

#ifndef PACKET_HOST
#define PACKET_HOST 0          /* skb->pkt_type: a frame to this host's MAC (linux/if_packet.h) */
#endif
#ifndef PACKET_OTHERHOST
#define PACKET_OTHERHOST 3     /* skb->pkt_type: a unicast frame to another host's MAC (linux/if_packet.h) */
#endif

#define IP_DF 0x4000
#define IP_MF 0x2000
#define IP_OFFSET 0x1fff

/* Tunable limits (override with -D at build time). */
#ifndef NAT_PORT_TRIES
#define NAT_PORT_TRIES 128  /* random SNAT source ports tried before giving up on a new flow (Cilium: 128) */
#endif

/* skb->data and skb->data_end loaded straight off the context register: clang may otherwise keep
 * a pointer to the field around, and the verifier only accepts ctx loads at fixed offsets. */
static __always_inline void *skb_data(const struct __sk_buff *skb)
{
	void *ptr;

	asm volatile("%0 = *(u32 *)(%1 + %2)" : "=r"(ptr) : "r"(skb), "i"(offsetof(struct __sk_buff, data)));
	return ptr;
}

static __always_inline void *skb_data_end(const struct __sk_buff *skb)
{
	void *ptr;

	asm volatile("%0 = *(u32 *)(%1 + %2)" : "=r"(ptr) : "r"(skb), "i"(offsetof(struct __sk_buff, data_end)));
	return ptr;
}

#endif
