/* A pass-through XDP program: the XDP benchmarks' floor, and what the lab attaches to the fabric side
 * of a veth whose other end transmits with XDP_TX (veth needs NAPI on the receiving peer). */
#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

SEC("xdp")
int xdp_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
