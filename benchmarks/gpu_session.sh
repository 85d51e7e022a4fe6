#!/usr/bin/env bash
# A lent GPU machine's session (benchmarks/README.md, "First GPU session"). Each call of the
# device tool runs one command of at most 10 minutes, without network, and brings back the
# files under $OUT (at most ~8): so the work comes in phases, each writing under $OUT
# (default ./gpu-session) device.txt, its log and one archive or table, and printing a
# short tail. Run from the repository root; nothing is fetched (PYTHONPATH=.).
#
#   bash benchmarks/gpu_session.sh tests [PYTEST ARGS]  GPU test suite -> tests.log
#   bash benchmarks/gpu_session.sh bench [SUITE ...]    every suite's --quick report (default: all
#                                                       suites) -> bench.log, reports-<gpu>.tgz
#   bash benchmarks/gpu_session.sh tune [MODEL ...]     tritium tune --export for gemma2-2b,
#                                                       gemma2-9b, glm4-9b -> tune.log, <sku>.json
#   bash benchmarks/gpu_session.sh all                  the three in one call, a third of BUDGET each
#
# BUDGET (default 510) is the seconds a phase may run; its items (suites, models) share it:
# each gets the time left divided by the items left, so one that finishes early leaves its
# time to the next and a slow one cannot eat the call. An item stopped at its share gets
# SIGINT: pytest prints its summary, `benchmarks run` keeps the operators it measured, and
# `tritium tune` keeps what it tuned in the cache, which is exported all the same.
# BENCH_ARGS (default --quick) go to every `benchmarks run`; TUNE_ARGS (default
# --batch 1 --seqlen 512,2048,8192 --no-backward) to every `tritium tune`.
# Wheels in .whl/ (ignored by git; carry it) are installed offline first (bitsandbytes).
#
# Afterwards: unpack reports-<gpu>.tgz into reports/ (its results.json is the baseline of
# .github/workflows/gpu.yml) and copy <sku>.json to tritium/autotune/configs/; commit them
# with device.txt.
set -uo pipefail
OUT=${OUT:-gpu-session}
BUDGET=${BUDGET:-510}
USAGE="usage: gpu_session.sh tests [PYTEST ARGS] | bench [SUITE ...] | tune [MODEL ...] | all"
PHASE=${1:?$USAGE}
shift
case "$PHASE" in tests | bench | tune) ;; all) [ $# -eq 0 ] || { echo "all takes no arguments" >&2; exit 2; } ;;
  *) echo "$USAGE" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1
# Each item has its own share of the budget (`share`), and SECONDS counts from here.
SECONDS=0

# Seconds for the next item: what is left of the phase's budget (it ends at DEADLINE, in
# SECONDS) divided by the ITEMS LEFT; 0 when under 20 s remain (the item is skipped).
share() {
  local left=$((($1 - SECONDS) / $2))
  echo $((left >= 20 ? left : 0))
}

# timed SECONDS LOG COMMAND...: run COMMAND, appending to LOG, stopped by SIGINT after
# SECONDS (then killed 20 s later); a line in LOG gives its exit status and wall time.
timed() {
  local limit=$1 log=$2 start=$SECONDS status
  shift 2
  if [ "$limit" -eq 0 ]; then
    echo "== skipped (no time left): $*" >> "$log"
    return 124
  fi
  echo "== $* (limit ${limit}s)" >> "$log"
  timeout -s INT -k 20 "$limit" "$@" >> "$log" 2>&1
  status=$?
  local verdict="exit $status"
  [ "$status" -eq 124 ] && verdict="stopped at its ${limit}s limit"
  echo "== $verdict after $((SECONDS - start))s: $*" >> "$log"
  return "$status"
}

if nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv > "$OUT/device.txt"; then
  :
else
  echo "nvidia-smi failed: no NVIDIA GPU here" | tee -a "$OUT/device.txt" >&2
fi
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" >> "$OUT/device.txt"
commit=$(git rev-parse HEAD 2>/dev/null) || commit=${GIT_COMMIT:-"unknown (no .git here: pass GIT_COMMIT)"}
echo "commit $commit" >> "$OUT/device.txt"
cat "$OUT/device.txt"
# A package pip cannot fetch here travels as a wheel (shared/GPU.md): install it offline.
if compgen -G ".whl/*.whl" > /dev/null; then
  python -m pip install -q --no-index --no-deps .whl/*.whl || echo "warning: installing .whl/*.whl failed" >&2
fi

tests_phase() {  # tests_phase DEADLINE [PYTEST ARGS]
  local deadline=$1 status
  shift
  timed "$(share "$deadline" 1)" "$OUT/tests.log" python -m pytest -q --durations=15 "${@:-tests}"
  status=$?
  tail -n 30 "$OUT/tests.log"
  return "$status"
}

bench_phase() {  # bench_phase DEADLINE [SUITE ...]
  local deadline=$1 log="$OUT/bench.log" work suites args status=0 rc n results=() slug
  shift
  suites=("$@")
  if [ ${#suites[@]} -eq 0 ]; then
    # The names live in tritium.bench, which imports triton: interpreted here, only to list them.
    read -r -a suites <<< "$(TRITON_INTERPRET=1 python -c "from tritium import bench; print(*bench.NAMES)")"
  fi
  read -r -a args <<< "${BENCH_ARGS---quick}"
  work=$(mktemp -d)
  n=${#suites[@]}
  for suite in "${suites[@]}"; do
    # 1: a tritium row failed accuracy; the report is written all the same.
    # 30 s of the budget are kept for merging the reports.
    timed "$(share $((deadline - 30)) "$n")" "$log" python -m benchmarks run --suite "$suite" "${args[@]}" --out "$work/$suite"
    rc=$?
    [ "$status" -ne 0 ] || status=$rc
    [ -s "$work/$suite/results.json" ] && results+=("$work/$suite/results.json")
    n=$((n - 1))
  done
  if [ ${#results[@]} -eq 0 ]; then
    echo "no suite wrote results" >> "$log"
    tail -n 30 "$log"
    rm -rf "$work"
    return 1
  fi
  slug=$(python -c "import json, sys; print(json.load(open(sys.argv[1]))['metadata']['device_slug'])" "${results[0]}")
  # One folder for the device, named as reports/ names it: the suites' results merged (as
  # `benchmarks report` merges them; it writes no results.json) and their report.
  if python - "$work/reports/$slug" "${results[@]}" >> "$log" 2>&1 <<'EOF'
import sys
from pathlib import Path

from benchmarks import report, results

out, *paths = map(Path, sys.argv[1:])
metadata, rows = results.merge([results.load(path) for path in paths])
results.save(out, metadata, rows)
report.write(out, metadata, rows)
print(f"wrote {out / 'README.md'}")
EOF
  then
    # The device tool brings back a few files: the report travels as one archive.
    tar czf "$OUT/reports-$slug.tgz" -C "$work/reports" "$slug"
  else
    echo "merging the suites' reports failed: archiving them one by one" | tee -a "$log"
    tar czf "$OUT/reports-$slug.tgz" -C "$work" --exclude=reports "${suites[@]}"
  fi
  echo "== $OUT/reports-$slug.tgz: ${#results[@]} of ${#suites[@]} suites" >> "$log"
  rm -rf "$work"
  grep -E "^(== |wrote |[0-9]+ tritium row)" "$log" | tail -n 30
  return "$status"
}

tune_phase() {  # tune_phase DEADLINE [MODEL ...]
  local deadline=$1 log="$OUT/tune.log" sku table models args status=0 rc n
  shift
  models=("$@")
  [ ${#models[@]} -gt 0 ] || models=(gemma2-2b gemma2-9b glm4-9b)
  read -r -a args <<< "${TUNE_ARGS---batch 1 --seqlen 512,2048,8192 --no-backward}"
  # tritium tune refuses without CUDA too, but the table's file name (the SKU) is needed first.
  if ! sku=$(python -c "
import sys
from tritium import autotune
sku = autotune.active_sku()
sys.exit('tune: needs a CUDA device, with TRITON_INTERPRET unset: nothing tuned') if sku is None else print(sku.slug)
" 2>> "$log"); then
    tail -n 5 "$log" >&2
    return 2
  fi
  table="$OUT/$sku.json"
  # A cache of this session's own (kept on a warm machine: a second call resumes).
  export TRITIUM_CACHE_DIR=${TRITIUM_CACHE_DIR:-${TMPDIR:-/tmp}/tritium-gpu-session}
  n=${#models[@]}
  for model in "${models[@]}"; do
    # 15 s of the budget are kept for the last export.
    timed "$(share $((deadline - 15)) "$n")" "$log" python -m tritium.cli tune --model "$model" "${args[@]}" --export "$table"
    rc=$?
    [ "$status" -ne 0 ] || status=$rc
    n=$((n - 1))
  done
  # A model stopped at its limit exported nothing: export the cache once more, as --export does.
  python - "$table" >> "$log" 2>&1 <<'EOF' || status=1
import sys
from pathlib import Path

import tritium  # noqa: F401  (registers the kernels)
from tritium import autotune
from tritium.autotune import store

sku = autotune.active_sku()
entries = autotune.valid_entries(sku)
if not store.write_entries(Path(sys.argv[1]), sku, entries):
    sys.exit(f"nothing exported: {sys.argv[1]} could not be written")
print(f"== {sys.argv[1]}: {sum(map(len, entries.values()))} entries of {len(entries)} kernels")
EOF
  grep -E "^(== |exported |skipped )" "$log" | tail -n 30
  return "$status"
}

case "$PHASE" in
  tests) tests_phase "$BUDGET" "$@" ;;
  bench) bench_phase "$BUDGET" "$@" ;;
  tune) tune_phase "$BUDGET" "$@" ;;
  all)
    tests_phase $((BUDGET / 3)); s1=$?
    bench_phase $((BUDGET * 2 / 3)); s2=$?
    tune_phase "$BUDGET"; s3=$?
    echo "== all: tests exit $s1, bench exit $s2, tune exit $s3"
    [ $s1 -eq 0 ] && [ $s2 -eq 0 ] && [ $s3 -eq 0 ] ;;
esac
