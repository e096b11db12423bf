#!/usr/bin/env bash
# Issue 15 on the GPU machine (device `run`, repo root; bench/gpu/README.md "Issue 15").
# Every step installs first if this machine has no /tmp/site yet: from the kit if `.kit/`
# came with the tree (../shared/gpu-kit, three parts: carry one per call until unpacked), else
# from `.whl/` (bench/gpu/fetch_wheels.sh; 5.6 MiB, one call). Output: $OUT/*.json, *.log.
#
#   bash bench/gpu/run_issue15.sh install
#   bash bench/gpu/run_issue15.sh truth PROFILE ARCHS [memory_truth args]   # e.g. truth rtx-4090-24gb small --jobs 6
#   bash bench/gpu/run_issue15.sh throughput        # Llama-3.1-8B shapes, 4-bit, no ckpt: new vs old vs FP16
#   bash bench/gpu/run_issue15.sh cap               # plan --measure --cap: one overruns, one fits
#   bash bench/gpu/run_issue15.sh gputests          # pytest -m gpu of the issue-15 tests
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
left() { echo $(( ${BUDGET:-570} - ($(date +%s) - start) )); }
# The full log to $1, then the last $2 lines without GPTQModel's banners on the terminal.
keep() { tee "$1" | grep -v -E '^(INFO|WARN|W[0-9]{4})' | tail -n "$2"; }

install() {
  if [ -f /tmp/site/.kit-installed ] || [ -f /tmp/site/.edgeqra-installed ]; then return 0; fi
  if [ -f .kit/MANIFEST ]; then
    bash .kit/unpack.sh || return 1
    [ -f /tmp/site/.kit-installed ] || { echo "kit: bring the next part (this call only stored it)"; return 2; }
  elif ls .whl/*.whl >/dev/null 2>&1; then
    bash bench/gpu/run_memory_truth.sh --install-only || return 1
  else
    echo "neither .kit/ nor .whl/ came with the tree: carry one (bench/gpu/README.md)"; return 1
  fi
}
install || exit $?
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
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
    python3 "$REPO/bench/memory_truth.py" --profile "$profile" --arch "$archs" \
      --time-limit "$(( $(left) - 60 ))" --out "$OUT/memory_truth_${tag}.json" "$@" 2>&1 \
      | keep "$OUT/memory_truth_${tag}.log" 80
    # The same rows through the memory model offline: worst under/over per phase.
    python3 "$REPO/bench/memory_replay.py" "$OUT/memory_truth_${tag}.json" 2>/dev/null | tail -n 3 \
      | tee -a "$OUT/memory_truth_${tag}.log"
    ;;
  throughput)
    # One fresh process per config (throughput.py's default since issue 15's H200 run, where
    # the FP16 model outlived its build and sat in both 4-bit peaks); --time-limit skips what
    # would not finish.
    python3 "$REPO/bench/throughput.py" --arch llama-3.1-8b --configs fp16,u4,u4-saved \
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
  *)
    echo "unknown step $step: install, truth, throughput, cap, gputests"; exit 2
    ;;
esac
