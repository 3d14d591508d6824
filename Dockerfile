# syntax=docker/dockerfile:1
# The bpflb image: one image, two entry points (`bpflb operator`, `bpflb agent`).
#
# The build stage runs the same `make bpf` the tests run (the BPF objects with clang -target bpf, and the
# Maglev helper library), then installs the product package (operator/bpflb: agent and operator) into a
# virtualenv. The workshop (operator/bpflb_lab: lab, benchmarks, traffic generators, kube-proxy
# baselines, emulated API) is never copied in, so the wheel holds bpflb alone and the `lab` extra's
# dependencies (kmock, scapy, matplotlib) are not installed. The runtime stage carries only what runs:
# that virtualenv, the objects the agent loads, the struct header it reads at start, and the system
# libraries (libbpf1, python3) and tools (iproute2) of a node agent. No compiler.
#
# Nothing on the project's CI machine can build images (no container engine); tests/chart/test_dockerfile.py
# checks this file's structure against the Makefile and the agent's code instead.
ARG DEBIAN=bookworm

FROM debian:${DEBIAN}-slim AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      clang llvm libbpf-dev libelf-dev linux-libc-dev libc6-dev make gcc \
      python3 python3-venv python3-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Makefile pyproject.toml ./
COPY bpf_objects/ bpf_objects/
COPY native/ native/
RUN make bpf
COPY operator/bpflb/ operator/bpflb/
RUN python3 -m venv /opt/bpflb \
 && /opt/bpflb/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/bpflb/bin/pip install --no-cache-dir .

FROM debian:${DEBIAN}-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 libbpf1 iproute2 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/bpflb /opt/bpflb
COPY --from=build /src/bpf_objects/build/bpf_lb.o /src/bpf_objects/build/bpf_xdp.o /src/bpf_objects/build/bpf_sock.o /usr/lib/bpflb/
COPY --from=build /src/bpf_objects/build/libbpflb_maglev.so /usr/lib/bpflb/
COPY --from=build /src/bpf_objects/include/lb_structs.h /usr/lib/bpflb/include/
ENV PATH=/opt/bpflb/bin:$PATH \
    BPFLB_BPF_DIR=/usr/lib/bpflb \
    BPFLB_BPF_INCLUDE=/usr/lib/bpflb/include \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# The operator runs as this unprivileged user; the agents' DaemonSet says runAsUser: 0 (with the
# capabilities BPF, NET_ADMIN and PERFMON only).
USER 65532:65532
ENTRYPOINT ["bpflb"]
CMD ["--help"]
