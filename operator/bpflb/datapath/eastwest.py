"""The in-cluster (east-west) state a node's datapath holds beside the Services: the pod CIDRs whose
sources the pod-facing tc path serves (lb_pod_cidrs, pod.h), through the one map-diff engine."""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Network

from bpflb.datapath.clustermaps import cidr_key
from bpflb.datapath.loader import MapSource
from bpflb.datapath.mapdiff import MapMirror

ANYWHERE = IPv4Network("0.0.0.0/0")


class EastWestMaps:
    """lb_pod_cidrs, written key by key (an LPM trie has no batch operations)."""

    def __init__(self, obj: MapSource) -> None:
        self.pod_cidrs = MapMirror(obj.map("lb_pod_cidrs"), batch=False)

    def sync(self, pod_cidrs: Iterable[IPv4Network]) -> int:
        """This node's pod CIDRs; none known (a Node without spec.podCIDR): every source, so the pod path
        still serves pods, without the source check.  Returns the keys touched."""
        nets = list(pod_cidrs) or [ANYWHERE]
        touched, refused = self.pod_cidrs.sync(dict.fromkeys((cidr_key(n) for n in nets), b"\x01"))
        if refused:                 # a handful of prefixes; the kernel's reason is worth a line
            raise OSError(f"lb_pod_cidrs: {len(refused)} prefixes refused: {refused[0][1]}")
        return touched
