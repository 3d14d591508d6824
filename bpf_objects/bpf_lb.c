/* bpflb's tc datapath: two programs attached with tc clsact on the node's external device.
 * lb_ingress (ingress hook): load-balances packets addressed to Service frontends
 * (NodePort on the node's addresses, LoadBalancer IPs, externalIPs) and translates replies
 * of flows this node SNAT'd.  lb_egress (egress hook): translates replies of flows that
 * were DNAT'd to a backend on this node.  All state lives in pinned maps (maps.h). */
#include "include/nodeport.h"

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

char LICENSE[] SEC("license") = "Dual BSD/GPL";
