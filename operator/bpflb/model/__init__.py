"""The load-balancer model: what one node's datapath should hold, from raw Kubernetes objects and the one configuration schema; no BPF, no API."""
