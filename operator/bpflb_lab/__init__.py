"""bpflb's workshop: the network-namespace lab, the benchmarks, their traffic generators, the kube-proxy
baselines and the emulated Kubernetes API. Not part of the image; `bpflb lab|bench|bench-kube` find it here."""
