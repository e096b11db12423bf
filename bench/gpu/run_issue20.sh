#!/usr/bin/env bash
# Issue 20 on the lent H200: the quality-at-budget benchmark (bench/quality_at_budget.py),
# which needs more device time than one session has, so it resumes across sessions and
# machines from a small state tarball.
#
# Prerequisite: the kit installed (../shared/gpu-kit/README.md: three calls with part-aa,
# part-ab, part-ac + .kit/env). Then one device call per step, each with `timeout_s: 600`:
#
#   bash bench/gpu/run_issue20.sh fidelity   # Spearman of each rung vs full length, 24 configs (est. 6-9 min)
#   bash bench/gpu/run_issue20.sh bench      # the benchmark; call again until it prints "all done"
#
# References and greedy rows are cached in references.jsonl, searches in their journals, so
# a cut call loses at most the evaluation in flight. The table prints when everything is done.
#
# State: every step ends by writing $OUT/qab-state.tar.gz (journals, summaries, rows; no
# adapters, no banks: those rebuild from the cache in seconds). Copy it back before the next
# session's calls and carry it:
#
#   mkdir -p .kit && cp /work/.device/<n>/qab-state.tar.gz .kit/qab-state.tar.gz
#   # then add ".kit/qab-state.tar.gz" to the `carry` of the first step of the session
#
# Without a carried one, the step starts from the committed bench/gpu/qab-state.tar.gz (it
# travels with the tree): commit the newest state there at the end of a session, since the
# device's files do not outlive it. QAB_JOBS searches run side by side on the one GPU
# (default 8; the machine has 16 cores, a 64-step evaluation of SmolLM2 takes ~2.5 s and a
# 4-step one ~1.2 s, mostly scoring: one process leaves the GPU mostly idle).
#
# Each step stops ~40 s before its 600 s call ends (QAB_LIMIT) and still writes the state.
set -uo pipefail
STEP=${1:?usage: run_issue20.sh fidelity|bench}
ROOT=$(pwd)
OUT=${OUT:-/tmp/issue20-out}
QAB=/tmp/qab
LIMIT=${QAB_LIMIT:-540}
mkdir -p "$OUT" "$QAB"
if [ -f .kit/env ]; then
  # shellcheck disable=SC1091
  . .kit/env
fi
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export GPTQMODEL_CPU_WORKERS=${GPTQMODEL_CPU_WORKERS:-4}
# QAB_JOBS search processes share 16 cores: two torch threads each, not sixteen.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
STATE=.kit/qab-state.tar.gz
[ -f "$STATE" ] || STATE=bench/gpu/qab-state.tar.gz
if [ -f "$STATE" ] && [ ! -f "$QAB/.restored" ]; then
  tar -xzf "$STATE" -C "$QAB" && touch "$QAB/.restored"
  echo "state restored from $STATE: $(find "$QAB" -name journal.jsonl | wc -l) run directories"
fi
BENCH="python3 $ROOT/bench/quality_at_budget.py --device cuda --jobs ${QAB_JOBS:-8} --out $QAB"
cd /tmp  # the repo's edgeqra/ must not shadow the installed package

save_state() {
  tar -czf "$OUT/qab-state.tar.gz" -C "$QAB" --exclude='*.safetensors' --exclude='*.bin' \
    --exclude='.restored' . 2>/dev/null
  [ -f "$QAB/rows.json" ] && cp "$QAB/rows.json" "$OUT/rows.json"
  echo "state: $(du -h "$OUT/qab-state.tar.gz" | cut -f1) in \$OUT/qab-state.tar.gz"
}
# A bare machine (the warm one was given back between calls) has no kit: say so, and return
# no state, so that an old tarball cannot be copied over a newer one.
if ! python3 -c "import edgeqra, gptqmodel" 2>/dev/null; then
  echo "no kit on this machine (a fresh one?): run the kit's three calls first; no state written" >&2
  exit 3
fi
trap save_state EXIT

case "$STEP" in
  fidelity)
    timeout "$LIMIT" $BENCH --tasks arc_easy --fidelity-check 24 2>&1 | tee "$OUT/fidelity.log" ;;
  bench)
    # The done-when of issue 20: both tasks at 3.5 and 4.0 bits, 3 seeds, every method.
    # QAB_TASKS=piqa skips a finished task's model load, bank and worker start-up (its rows
    # stay in bench/measurements/); the table of both tasks is then made from the two files.
    timeout "$LIMIT" $BENCH --tasks ${QAB_TASKS:-arc_easy piqa} --budget-bits 3.5 4.0 --seeds 0 1 2 \
      2>&1 | tee "$OUT/bench.log"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 0 ]; then
      echo "all done"
    elif [ "$rc" -eq 124 ]; then
      echo "cut at ${LIMIT} s: call this step again (it resumes from the journals)"
    else
      echo "the benchmark failed (exit $rc): see \$OUT/bench.log" >&2; exit "$rc"
    fi ;;
  *)
    echo "unknown step $STEP" >&2; exit 2 ;;
esac
