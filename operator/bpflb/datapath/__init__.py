"""The BPF adapter: libbpf binding, loading and attaching, map programming (one diff engine), the overlay, and the seam the agent drives (kernel and in-memory implementations)."""
