#!/usr/bin/env bash
# Issue 15 on the GPU machine (device `run`, repo root; bench/gpu/README.md "Issue 15").
# Every step installs first if this machine has no /tmp/site yet: from the kit if `.kit/`
# came with the tree (../shared/gpu-kit, three parts: carry one per call until unpacked), else
# from `.whl/` (bench/gpu/fetch_wheels.sh; 5.6 MiB, one call). Output: $OUT/*.json, *.log.
#
#   bash bench/gpu/run_issue15.sh install
#   bash bench/gpu/run_issue15.sh truth PROFILE ARCHS [memory_truth args]   # e.g. truth rtx-4090-24gb small --jobs 6
#   bash bench/gpu/run_issue15.sh throughput        # Llama-3.1-8B shapes, 4-bit, no ckpt: new (2 dequants) vs old vs FP16
#   bash bench/gpu/run_issue15.sh cap               # plan --measure --cap: one overruns, one fits
#   bash bench/gpu/run_issue15.sh gputests          # pytest -m gpu of the issue-15 tests
#   bash bench/gpu/run_issue15.sh census|snapshot   # bench/peak_census.py runs (snapshot: allocator history)
#   bash bench/gpu/run_issue15.sh queue             # everything issue 15 still lacks, resumable:
#                                                   # call again until it prints "all done"
#
# `queue` runs the census, the snapshots, the cap, the four truth grids left, the GPU tests and the
# throughput in that order, each into /tmp/i15 (restored from .kit/i15-state.tar.gz when
# carried, else from the committed bench/gpu/i15-state.tar.gz), skips what a previous call
# finished, resumes a cut grid (memory_truth.py --resume), starts nothing it cannot finish in
# the time left, and ends every call by writing $OUT/i15-state.tar.gz plus the JSONs and logs
# so far to $OUT.
#
# Each step stops starting work ~60 s before BUDGET (default 570 s of the 600 s call). Every
# step writes its whole output to $OUT/<step>.log first and only then shows a filtered tail
# (GPTQModel's INFO/WARN banners dropped), so nothing is lost to the tail.
set -uo pipefail
start=$(date +%s)
cd "$(dirname "$0")/../.."
REPO=$(pwd)
OUT=${OUT:-/tmp/edgeqra-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 GPTQMODEL_CPU_WORKERS=${GPTQMODEL_CPU_WORKERS:-4}
# Where the kit installs (unpack.sh's /tmp/site); `queue` keeps its state in I15_DIR.
SITE=${EDGEQRA_SITE:-/tmp/site}
left() { echo $(( ${BUDGET:-570} - ($(date +%s) - start) )); }
# The full log to $1, then the last $2 lines without GPTQModel's banners on the terminal.
keep() { tee "$1" | grep -v -E '^(INFO|WARN|W[0-9]{4})' | tail -n "$2"; }

install() {
  if [ -f "$SITE/.kit-installed" ] || [ -f "$SITE/.edgeqra-installed" ]; then return 0; fi
  if [ -f .kit/MANIFEST ]; then
    bash .kit/unpack.sh || return 1
    [ -f "$SITE/.kit-installed" ] || { echo "kit: bring the next part (this call only stored it)"; return 2; }
  elif ls .whl/*.whl >/dev/null 2>&1; then
    bash bench/gpu/run_memory_truth.sh --install-only || return 1
  else
    echo "neither .kit/ nor .whl/ came with the tree: carry one (bench/gpu/README.md)"; return 1
  fi
}
install || exit $?
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
step=${1:-install}; shift || true
# Run from /tmp so that the repo's edgeqra/ does not shadow the installed package (profiles).
cd /tmp

case "$step" in
  install)
    python3 -c "import torch, gptqmodel, edgeqra; print('ok', torch.__version__, gptqmodel.__version__, torch.cuda.get_device_name(0))"
    ;;
  truth)
    profile=$1; archs=$2; shift 2
    tag="${profile}_${archs//,/_}"
    # --time-limit stops starting configs; the timeout ends the ones in flight before the call
    # does (the JSON already holds every finished config; --resume measures the rest).
    timeout "$(( $(left) - 15 ))" python3 "$REPO/bench/memory_truth.py" --profile "$profile" \
      --arch "$archs" --time-limit "$(( $(left) - 60 ))" --out "$OUT/memory_truth_${tag}.json" "$@" 2>&1 \
      | keep "$OUT/memory_truth_${tag}.log" 80
    # The same rows through the memory model offline: worst under/over per phase.
    python3 "$REPO/bench/memory_replay.py" "$OUT/memory_truth_${tag}.json" 2>/dev/null | tail -n 3 \
      | tee -a "$OUT/memory_truth_${tag}.log"
    ;;
  throughput)
    # One fresh process per config (throughput.py's default since issue 15's H200 run, where
    # the FP16 model outlived its build and sat in both 4-bit peaks); --time-limit skips what
    # would not finish.
    python3 "$REPO/bench/throughput.py" --arch llama-3.1-8b --configs fp16,u4,u4-moddq,u4-saved \
      --phases finetune --kernels triton,torch --micro-batch 2 --seq-len 1024 --steps 6 \
      --time-limit "$(( $(left) - 20 ))" --out "$OUT/throughput_llama-3.1-8b.json" "$@" 2>&1 \
      | keep "$OUT/throughput_llama-3.1-8b.log" 30
    ;;
  cap)
    A=$REPO/examples/architectures
    fp16=$(python3 -c 'print(",".join(["16/8"] * 32))')
    # The overrun first: it stops at the build (seconds); the fitting run then gets the rest
    # of the call (random 8B checkpoint, Marlin JIT build) and a timeout so the log survives.
    {
      echo "== overruns: FP16 LoRA of Llama-3.1-8B on rtx-4070-12gb (predicted 17.6 GiB > 11.5)"
      python3 -m edgeqra.cli plan --profile rtx-4070-12gb --model "$A/llama-3.1-8b" --measure --cap \
        --config "$fp16"
      echo "exit $?"
      echo "== fits: the planned config of Llama-3.1-8B on rtx-4070-12gb (predicted <= budget)"
      t=$(( $(left) - 10 )); [ "$t" -ge 1 ] || t=1  # timeout 0 would mean none
      timeout "$t" python3 -m edgeqra.cli plan --profile rtx-4070-12gb --model "$A/llama-3.1-8b" \
        --measure --cap
      echo "exit $? (124: timed out)"
    } 2>&1 | keep "$OUT/cap.log" 60
    ;;
  gputests)
    python3 -m pytest -p no:cacheprovider -m gpu -q \
      "$REPO/tests/test_cap.py" "$REPO/tests/test_measure.py" "$REPO/tests/test_quantized_tune.py" \
      "$REPO/tests/test_qlinear.py" \
      2>&1 | keep "$OUT/gputests.log" 30
    ;;
  census|snapshot)
    # What holds the under-predicted peaks on the GPU (bench/peak_census.py; RESULTS.md,
    # "Where the two shortfalls sit"). `census`: SmolLM2 fine-tuning FP16 and 4-bit, Qwen2.5-1.5B
    # 8-bit inference, SmolLM2 with one adapter (done 2026-12-04: the live tensors equal the
    # CPU's, and the allocator holds 45 MiB more with 30 adapted layers, 8 with one).
    # `snapshot`: the same script with the allocator's history recorded, which names by
    # allocating Python frame what no tensor holds: SmolLM2's step, and the build leftovers of
    # Qwen2.5-1.5B at 8 bits (61 MiB) and Qwen2.5-7B in FP16 (44 MiB). One JSON each; a
    # finished one is not run again.
    A=$REPO/examples/architectures
    run_census() {  # name, then peak_census arguments
      local name=$1; shift
      [ -f "$OUT/$name.json" ] && return 0
      timeout "$(( $(left) - 10 ))" python3 "$REPO/bench/peak_census.py" --device cuda \
        --out "$OUT/$name.json.tmp" "$@" > "$OUT/$name.log" 2>&1 \
        && mv "$OUT/$name.json.tmp" "$OUT/$name.json"
      echo "$name: $([ -f "$OUT/$name.json" ] && echo done || echo "not done, see $name.log")"
    }
    if [ "$step" = census ]; then
      run_census census_smollm2_fp16 --arch "$A/smollm2-135m"
      run_census census_smollm2_u4 --arch "$A/smollm2-135m" --config 4/8x30
      run_census census_qwen_u8 --arch "$A/qwen2.5-1.5b" --phase inference --config 8/8x28
      run_census census_smollm2_one_adapter --arch "$A/smollm2-135m" --config 16/8,16/0x29
    else
      run_census snapshot_smollm2_fp16 --snapshot --arch "$A/smollm2-135m"
      run_census snapshot_qwen_u8 --snapshot --arch "$A/qwen2.5-1.5b" --phase inference \
        --config 8/8x28
      run_census snapshot_qwen7b_fp16 --snapshot --arch "$A/qwen2.5-7b" --phase inference \
        --config 16/8x28
    fi
    ;;
  queue)
    Q=${I15_DIR:-/tmp/i15}
    mkdir -p "$Q"
    state=$REPO/.kit/i15-state.tar.gz
    [ -f "$state" ] || state=$REPO/bench/gpu/i15-state.tar.gz
    if [ -f "$state" ] && [ ! -f "$Q/.restored" ]; then
      tar -xzf "$state" -C "$Q" && echo "state restored from $state"
    fi
    touch "$Q/.restored"
    save() {
      tar -czf "$OUT/i15-state.tar.gz" -C "$Q" --exclude=.restored --exclude='*.tmp' . 2>/dev/null
      cp "$Q"/*.json "$Q"/*.log "$OUT"/ 2>/dev/null
      echo "state: $(du -h "$OUT/i15-state.tar.gz" | cut -f1) in \$OUT/i15-state.tar.gz"
    }
    trap save EXIT
    sub() { OUT=$Q BUDGET=$(left) bash "$REPO/bench/gpu/run_issue15.sh" "$@"; }
    # The truth grid of one (profile, archs) is complete when every config has all phases.
    complete() {
      [ -f "$Q/memory_truth_$1.json" ] && python3 - "$REPO/bench" "$Q/memory_truth_$1.json" <<'PY'
import json, sys
sys.path.insert(0, sys.argv[1])
from memory_truth import grid_complete
with open(sys.argv[2]) as f:
    sys.exit(0 if grid_complete(json.load(f)) else 1)
PY
    }
    pending=0
    task() {  # name, seconds it needs, then the step: run it only if it can finish
      local name=$1 need=$2; shift 2
      if [ -f "$Q/$name.done" ]; then return 0; fi
      if [ "$(left)" -lt "$need" ]; then pending=1; echo "$name: left for the next call"; return 0; fi
      echo "== $name ($(date +%T), $(left) s left)"
      sub "$@"
      case "$name" in
        truth_*) complete "${name#truth_}" && touch "$Q/$name.done" ;;
        cap) grep -q "^exit 124 " "$Q/cap.log" || touch "$Q/$name.done" ;;  # 124: timed out
        *) touch "$Q/$name.done" ;;
      esac
      [ -f "$Q/$name.done" ] || pending=1
    }
    # Jobs per grid: the 8B-class checkpoints of jobs in flight share 64 GiB of disk and
    # 128 GiB of host memory (a u8 one is ~8.5 GB), the 4090 grids' FP16 fine-tuning ~37 GiB
    # of the GPU each.
    task census 240 census
    task snapshot 300 snapshot
    task cap 330 cap
    task truth_rtx-4090-24gb_llama-3.1-8b 180 truth rtx-4090-24gb llama-3.1-8b --jobs 3 --resume
    task truth_rtx-4090-24gb_qwen2.5-7b 180 truth rtx-4090-24gb qwen2.5-7b --jobs 3 --resume
    task truth_jetson-orin-nano-8gb_small 120 truth jetson-orin-nano-8gb small --jobs 8 --resume
    task truth_jetson-orin-nano-8gb_large 180 truth jetson-orin-nano-8gb large --jobs 4 --resume
    task gputests 270 gputests
    # The recompute backward's two dequant kernels side by side with FP16 and the saved path
    # (8B shapes, 4 fresh processes; 191 s for three of them on 2026-12-02).
    task throughput 300 throughput
    if [ "$pending" -eq 0 ]; then echo "all done"; else echo "call queue again (it resumes)"; fi
    ;;
  *)
    echo "unknown step $step: install, truth, throughput, cap, gputests, census, snapshot, queue"; exit 2
    ;;
esac
