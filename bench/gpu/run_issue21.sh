#!/usr/bin/env bash
# Issue 21 on the lent H200: the SmolLM2 merge table (before merge / adapter form / merged old /
# merged new, >= 570 ARC-Easy items, per-layer merge error) for a mixed config searched at
# ~3.5 bits and for uniform 4-bit, plus the CUDA-kernel load-and-generate test.
#
# Prerequisite (../shared/gpu-kit/README.md): the kit unpacked on the machine, three calls
# with part-aa, part-ab, part-ac (the last one ends with `. .kit/env`). Then one device call
# per step below, back to back (the machine must stay warm: run dirs live in /tmp/issue21),
# each with `timeout_s: 600`, run from the repository root:
#
#   bash bench/gpu/run_issue21.sh search        # mixed search, budget_bits 3.5 (est. 6-9 min)
#   bash bench/gpu/run_issue21.sh search        # again only if the first was cut off (--resume)
#   bash bench/gpu/run_issue21.sh exports       # adapter + merged new (grid)  (est. 2-4 min)
#   bash bench/gpu/run_issue21.sh old           # merged old (requantize), unmerged fallback + table (est. 3-5 min)
#   bash bench/gpu/run_issue21.sh upbits        # the grid merge with `upbits` + table (est. 2-3 min)
#   bash bench/gpu/run_issue21.sh uniform       # uniform 4/8 run (4-bit bank only)   (est. 3-5 min)
#   bash bench/gpu/run_issue21.sh uniform-exports  # its adapter, new and old merge + table (est. 4-6 min)
#   bash bench/gpu/run_issue21.sh mixed          # bits 3,4 at rank 8 only: a mixed 3.5-bit config (est. 3 min)
#   bash bench/gpu/run_issue21.sh mixed-exports  # its adapter, grid (unmerged default), requantize, report + table
#   bash bench/gpu/run_issue21.sh tests         # pytest tests/test_export.py -m gpu (est. 3-5 min)
#   bash bench/gpu/run_issue21.sh onnx          # optional: ONNX from export-gptq, CPU tok/s
#
# None of these durations is measured yet (estimates from bench/RESULTS.md's H100/H200 figures:
# bank of 4 widths ~2 min, a 32-step evaluation ~15 s, scoring 570 items < 2 s). Every step
# writes its log and the manifests / merge_table.json under $OUT.
set -euo pipefail
STEP=${1:?usage: run_issue21.sh search|exports|old|upbits|uniform|uniform-exports|mixed|mixed-exports|tests|onnx|table}
ROOT=$(pwd)
OUT=${OUT:-/tmp/issue21-out}
mkdir -p "$OUT"
if [ -f .kit/env ]; then
  # shellcheck disable=SC1091
  . .kit/env
fi
export GPTQMODEL_CPU_WORKERS=${GPTQMODEL_CPU_WORKERS:-4}
RUNS=/tmp/issue21
MIXED=$RUNS/mixed
UNIFORM=$RUNS/uniform4
BENCH="python3 $ROOT/bench/export_smollm2.py"
mkdir -p "$RUNS"
cd /tmp  # the repo's edgeqra/ must not shadow the installed package

save() {  # copy what a step produced into $OUT (small files only)
  local run=$1
  for f in "$run"/summary.json "$run"/chosen.json "$run"/merge_table.json; do
    [ -f "$f" ] && cp "$f" "$OUT/$(basename "$run")-$(basename "$f")"
  done
  for pkg in "$run"/export-*; do
    [ -f "$pkg/manifest.json" ] && cp "$pkg/manifest.json" "$OUT/$(basename "$run")-$(basename "$pkg")-manifest.json"
  done
  return 0
}

case "$STEP" in
  search)
    $BENCH --out "$MIXED" --search-only --device cuda --n-eval 570 --bits 2,3,4,8 \
      --target-bits 3.5 --evals 12 --steps 32 --calib-samples 64 2>&1 | tee "$OUT/search.log"
    save "$MIXED" ;;
  exports)
    $BENCH --out "$MIXED" --merge-table adapter,grid 2>&1 | tee "$OUT/exports.log"
    save "$MIXED" ;;
  old)
    $BENCH --out "$MIXED" --merge-table requantize,unmerged 2>&1 | tee "$OUT/old.log"
    save "$MIXED" ;;
  upbits)
    $BENCH --out "$MIXED" --merge-table upbits 2>&1 | tee "$OUT/upbits.log"
    save "$MIXED" ;;
  uniform)
    $BENCH --out "$UNIFORM" --search-only --device cuda --n-eval 570 --uniform 4 --steps 32 \
      --calib-samples 64 2>&1 | tee "$OUT/uniform.log"
    save "$UNIFORM" ;;
  mixed)  # 2026-12-02: the 2/3/4/8 search at 3.5 bits chose uniform 3-bit; this one must mix
    $BENCH --out "$RUNS/mixed34" --search-only --device cuda --n-eval 570 --bits 3,4 --ranks 8 \
      --target-bits 3.5 --evals 12 --steps 32 --calib-samples 64 2>&1 | tee "$OUT/mixed34.log"
    save "$RUNS/mixed34" ;;
  mixed-exports)
    $BENCH --out "$RUNS/mixed34" --merge-table adapter,grid,requantize,unmerged 2>&1 | tee "$OUT/mixed34-exports.log"
    $BENCH --out "$RUNS/mixed34" --table | tee "$OUT/table-mixed34.md"
    save "$RUNS/mixed34" ;;
  uniform-exports)
    $BENCH --out "$UNIFORM" --merge-table adapter,grid,requantize,unmerged 2>&1 | tee "$OUT/uniform-exports.log"
    save "$UNIFORM" ;;
  onnx)
    $BENCH --out "$MIXED" --merge-table onnx 2>&1 | tee "$OUT/onnx.log"
    save "$MIXED" ;;
  table)
    $BENCH --out "$MIXED" --table | tee "$OUT/table-mixed.md"
    $BENCH --out "$UNIFORM" --table | tee "$OUT/table-uniform.md" ;;
  tests)
    python3 -m pytest "$ROOT/tests/test_export.py" -m gpu -q -s -p no:cacheprovider 2>&1 \
      | tee "$OUT/tests-gpu.log" ;;
  *)
    echo "unknown step $STEP" >&2; exit 2 ;;
esac
