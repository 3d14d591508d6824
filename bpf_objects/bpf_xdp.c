/* bpflb's XDP program (xdpAcceleration Native or BestEffort): attached to the node's external device
 * in front of the tc programs, sharing all their pinned maps.  It forwards requests for remote
 * backends and the replies of SNAT'd flows itself and passes everything else on to tc (xdp.h). */
#include "include/xdp.h"

SEC("xdp")
int xdp_lb_prog(struct xdp_md *ctx)
{
	return xdp_lb(ctx);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
