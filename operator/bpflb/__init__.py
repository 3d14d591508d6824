"""bpflb: a BPF load balancer for Kubernetes Services (north-south traffic)."""

__version__ = "0.1.0"
