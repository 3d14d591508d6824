"""bpflb's test suite: unit (no root), control (the operator against an emulated API), chart, bpf (real objects under BPF_PROG_TEST_RUN), lab (real namespaces)."""
