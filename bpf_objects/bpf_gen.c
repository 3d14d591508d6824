/* The rate benchmark's traffic tools (bpflb bench, operator/bpflb/trafficgen.py); none of them is
 * part of the load balancer.
 *
 * xdp_gen   the sender: run with BPF_PROG_TEST_RUN and BPF_F_TEST_XDP_LIVE_FRAMES in the client's
 *           namespace, with ingress_ifindex = the client's eth0.  Each run of the program is one
 *           frame: it gives the frame the next source port of a cycle of gen_config[GEN_FLOWS]
 *           ports starting at gen_config[GEN_BASE_PORT] (UDP checksum 0, TCP checksum fixed up) and
 *           returns XDP_TX, so the kernel transmits it out of eth0.  Live frames are recycled
 *           without being reset, and a frame's page comes back after the load balancer under test
 *           has rewritten its headers in place: every run first copies the GEN_HDR_LEN bytes of
 *           headers from gen_template.
 * xdp_sink  the receiver: attached to a backend pod's eth0, it counts the sender's frames (UDP
 *           whose payload starts with GEN_MAGIC) and drops them, so the pod's own stack and echo
 *           server never spend time on the flood.  Everything else passes.
 * xdp_pass  attached to the fabric side of the client's veth: veth delivers XDP_TX frames only to
 *           a peer that runs XDP (or has GRO on), and this program is the cheapest way to be one.
 */
#include <linux/types.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define GEN_FLOWS 0          /* gen_config index: source ports in the cycle (0: leave the frame as is) */
#define GEN_BASE_PORT 1      /* gen_config index: first source port of the cycle */
#define GEN_MAGIC 0x42504c42 /* "BPLB" (network order), the first payload bytes of a generated frame */
#define GEN_HDR_LEN 56       /* Ethernet + IPv4 + TCP without options, or UDP and the magic; frames are >= 60 */

struct gen_hdr {
	__u8 bytes[GEN_HDR_LEN];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct gen_hdr);
} gen_template SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, __u32);
} gen_config SEC(".maps");

/* Frames the sink counted: index 0 = generated frames received (per CPU). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sink_count SEC(".maps");

__u64 gen_seq;   /* frames sent so far; live frames run on one CPU, so a plain increment will do */

static __always_inline __u16 csum_fold32(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)sum;
}

SEC("xdp")
int xdp_gen(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	__u32 key = 0, *flows, *base;
	struct gen_hdr *tmpl;
	__u16 port;

	if (data + GEN_HDR_LEN > data_end)
		return XDP_TX;
	tmpl = bpf_map_lookup_elem(&gen_template, &key);
	if (tmpl)
		__builtin_memcpy(data, tmpl->bytes, GEN_HDR_LEN);
	if (ip->ihl != 5)
		return XDP_TX;
	key = GEN_FLOWS;
	flows = bpf_map_lookup_elem(&gen_config, &key);
	key = GEN_BASE_PORT;
	base = bpf_map_lookup_elem(&gen_config, &key);
	if (!flows || !base || *flows == 0)
		return XDP_TX;
	port = (__u16)(*base + (__u32)(gen_seq++ % *flows));
	if (ip->protocol == IPPROTO_UDP) {
		struct udphdr *udp = (void *)(ip + 1);

		if ((void *)(udp + 1) > data_end)
			return XDP_TX;
		udp->source = bpf_htons(port);
		udp->check = 0;
	} else if (ip->protocol == IPPROTO_TCP) {
		struct tcphdr *tcp = (void *)(ip + 1);
		__u16 old;

		if ((void *)(tcp + 1) > data_end)
			return XDP_TX;
		old = tcp->source;
		tcp->source = bpf_htons(port);
		/* RFC 1624: HC' = ~(~HC + ~m + m') */
		tcp->check = ~csum_fold32((__u32)(__u16)~tcp->check + (__u16)~old + tcp->source);
	}
	return XDP_TX;
}

SEC("xdp")
int xdp_sink(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct udphdr *udp = (void *)(ip + 1);
	__u32 *magic = (void *)(udp + 1);
	__u32 key = 0;
	__u64 *count;

	if ((void *)(magic + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP) ||
	    ip->protocol != IPPROTO_UDP || ip->ihl != 5 || *magic != bpf_htonl(GEN_MAGIC))
		return XDP_PASS;
	count = bpf_map_lookup_elem(&sink_count, &key);
	if (count)
		*count += 1;
	return XDP_DROP;
}

SEC("xdp")
int xdp_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
