"""kube-proxy's rule sets, generated for the benchmark's baselines: the iptables mode (iptables-restore
input) and the nftables mode (nft -f input) kube-proxy would program on one node for a Snapshot of
Services, EndpointSlices and Nodes, and the glue that loads them into a lab node's namespace."""

from bpflb_lab.kubeproxy.model import Endpoint, NodeView, ServicePort, node_view

MODES = ("iptables", "nftables")

__all__ = ["MODES", "Endpoint", "NodeView", "ServicePort", "node_view"]
