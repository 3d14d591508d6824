#!/usr/bin/env bash
# CI's benchmark step, after the tests (`make bench-quick`): every benchmark the docs show, in its quick form.
# It prints figures and fails only when one cannot be measured; nothing here is timed or compared.
set -euo pipefail
cd "$(dirname "$0")/.."
BPFLB=${BPFLB:-.venv/bin/bpflb}
OUT=${OUT:-results/ci}
"$BPFLB" bench --quick --out "$OUT"
"$BPFLB" bench --maglev --quick --out "$OUT"
"$BPFLB" bench --clusterip --quick --out "$OUT"
"$BPFLB" bench-kube fullsync --services 1000 --endpoints 10
"$BPFLB" bench-kube latency --services 1000 --endpoints 10 --changes 20
lab="bpflb-ci$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')"
trap '"$BPFLB" lab down --name "$lab" >/dev/null 2>&1 || true' EXIT
"$BPFLB" lab up --kube --name "$lab"
"$BPFLB" bench-kube latency --name "$lab" --changes 20
