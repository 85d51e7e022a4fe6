#!/usr/bin/env bash
# One call on a lent GPU machine (see ../shared/GPU.md): the GPU test suite, then the
# benchmark suites, everything written under $OUT (default ./gpu-session): device.txt,
# tests.log, bench.log and report.tgz (unpack into reports/<gpu>/ and commit). Run from the
# repository root; nothing is installed (that machine has no network).
#   bash benchmarks/gpu_session.sh [SUITE] [--quick]
set -uo pipefail
OUT=${OUT:-gpu-session}
SUITE=${1:-all}
shift || true
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv | tee "$OUT/device.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
python -m pytest -q -x tests 2>&1 | tee "$OUT/tests.log" | tail -n 30
REPORT=$(mktemp -d)/report
python -m benchmarks run --suite "$SUITE" --out "$REPORT" "$@" 2>&1 | tee "$OUT/bench.log" | tail -n 60
# The device tool brings back at most 8 files: the report travels as one archive.
tar czf "$OUT/report.tgz" -C "$(dirname "$REPORT")" report
