/* bpflb's tc datapath: two programs attached with tc clsact.
 * lb_ingress, on the ingress hook of the node's external device (and, with tunnelMode VXLAN, of the
 * overlay device bpflb_vxlan, where decapsulated requests and replies arrive): load-balances packets
 * addressed to Service frontends (NodePort on the node's addresses, LoadBalancer IPs, externalIPs)
 * by SNAT or DSR, translates replies of flows this node SNAT'd, and accepts DSR requests for its pods.
 * lb_egress, on the egress hook of the external device: translates replies of flows DNAT'd to a pod
 * of this node (local backends, DSR), and sends pods' replies to other nodes through the overlay.
 * lb_overlay_egress, on the egress hook of the overlay device (tunnelMode VXLAN): translates local pods'
 * replies to clients that are other nodes' pods, and moves the node's own connections to other nodes'
 * pods off ports a SNAT'd flow holds, as lb_egress does for the rest.
 * lb_pod_ingress and lb_pod_egress, on the ingress and egress hooks of the host side of every pod's
 * veth: in-cluster traffic the socket LB (bpf_sock.o) did not see, a pod's packets to Service frontends
 * (ClusterIP included) DNAT'd to a backend and the replies shown from the frontend again (pod.h).
 * All state lives in pinned maps (maps.h, dsr.h, tunnel.h, east_west.h, and the selection headers). */
#include "include/nodeport.h"
#include "include/pod.h"

SEC("tc")
int lb_ingress(struct __sk_buff *skb)
{
	return np_ingress(skb);
}

SEC("tc")
int lb_egress(struct __sk_buff *skb)
{
	return np_egress(skb);
}

SEC("tc")
int lb_overlay_egress(struct __sk_buff *skb)
{
	return np_overlay_egress(skb);
}

SEC("tc")
int lb_pod_ingress(struct __sk_buff *skb)
{
	return pod_ingress(skb);
}

SEC("tc")
int lb_pod_egress(struct __sk_buff *skb)
{
	return pod_egress(skb);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
