#!/usr/bin/env bash
# The suite under two CPU kernel families on one machine (`make test-kernels`; extra arguments
# go to pytest). The same torch build dispatches different float kernels by CPU (torch's own
# AVX2 / AVX-512 paths, oneDNN, MKL) and their sums round differently, so a test that pins
# float bytes passes on one machine and fails on another. CI runs on one machine only; this
# makes the difference visible there: the default kernels first, then a second family chosen
# by environment (AVX2 on an AVX-512 machine, the plain non-vector kernels on an AVX2 one).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
CAP="import torch; print(torch.backends.cpu.get_cpu_capability())"
cap=$("$BIN/python" -c "$CAP")
if [[ $cap == AVX512* ]]; then
  second=(ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2)
else
  second=(ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_ENABLE_INSTRUCTIONS=SSE4_2)
fi
echo "== kernel family 1: the default ($cap)"
"$BIN/pytest" "$@"
echo "== kernel family 2: ${second[*]} ($(env "${second[@]}" "$BIN/python" -c "$CAP"))"
env "${second[@]}" "$BIN/pytest" "$@"
