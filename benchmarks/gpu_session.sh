#!/usr/bin/env bash
# A lent GPU machine's session: each call of the device tool runs at
# most 10 minutes, so the work comes in phases, each writing under $OUT (default
# ./gpu-session). Run from the repository root; nothing is installed (no network there).
#
#   bash benchmarks/gpu_session.sh tests [PYTEST ARGS]     GPU test suite -> tests.log
#   bash benchmarks/gpu_session.sh bench SUITE [--quick]   one suite -> bench-SUITE.log, report-SUITE.tgz
#
# Unpack the report archives into reports/<gpu>/ (python -m benchmarks report merges them)
# and commit them with device.txt.
set -uo pipefail
OUT=${OUT:-gpu-session}
PHASE=${1:?usage: gpu_session.sh tests [PYTEST ARGS] | bench SUITE [--quick]}
shift
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv > "$OUT/device.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$OUT/device.txt"
git rev-parse HEAD >> "$OUT/device.txt" 2>/dev/null
cat "$OUT/device.txt"
case "$PHASE" in
  tests)
    python -m pytest -q --durations=15 "${@:-tests}" 2>&1 | tee "$OUT/tests.log" | tail -n 60 ;;
  bench)
    SUITE=${1:?bench needs a SUITE}
    shift
    REPORT=$(mktemp -d)/report-$SUITE
    python -m benchmarks run --suite "$SUITE" --out "$REPORT" "$@" 2>&1 | tee "$OUT/bench-$SUITE.log" | tail -n 60
    STATUS=${PIPESTATUS[0]}  # 1: a tritium row failed accuracy; its report is archived all the same
    # The device tool brings back at most 8 files: the report travels as one archive.
    tar czf "$OUT/report-$SUITE.tgz" -C "$(dirname "$REPORT")" "report-$SUITE"
    exit "$STATUS" ;;
  *)
    echo "unknown phase $PHASE (tests | bench)" >&2; exit 2 ;;
esac
