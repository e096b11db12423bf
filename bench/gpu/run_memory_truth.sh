#!/usr/bin/env bash
# Run ON THE GPU MACHINE (from the device tool, with `.whl` carried), from the repo root:
# install the carried wheels into /tmp/site (once per warm machine), then the memory-truth
# grid for the given architectures. Everything it prints also goes to $OUT.
#
#   bash bench/gpu/run_memory_truth.sh small                 # SmolLM2, Llama-3.2-1B, Qwen2.5-1.5B
#   bash bench/gpu/run_memory_truth.sh qwen2.5-7b
#   bash bench/gpu/run_memory_truth.sh llama-3.1-8b --configs m0,m1,m2
#   bash bench/gpu/run_memory_truth.sh --install-only        # just the install (+ import check)
#
# Extra arguments go to bench/memory_truth.py (e.g. --profile, --kernels, --configs).
set -uo pipefail
start=$(date +%s)
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/edgeqra-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 GPTQMODEL_CPU_WORKERS=${GPTQMODEL_CPU_WORKERS:-4}
SITE=/tmp/site

if [ ! -f "$SITE/.edgeqra-installed" ]; then
  t0=$(date +%s)
  ls .whl/*.whl .whl/pypcre-*.tar.gz >/dev/null || { echo "no .whl/: carry it (bench/gpu/fetch_wheels.sh)"; exit 1; }
  # PyPcre: C extension built here from its sdist (gcc; links the system libpcre2-8 that
  # ldconfig finds; its header ships in the sdist); no network needed.
  python3 -m pip wheel -q --no-deps --no-build-isolation --no-index -w /tmp/pcre-wheel .whl/pypcre-*.tar.gz \
    || { echo "PyPcre did not build; see above (try PYPCRE_LIBRARY_PATH=/path/libpcre2-8.so.0)"; exit 1; }
  # The README's --target recipe, plus edgeqra itself (non-editable: its profiles ship as a package).
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    .whl/*.whl /tmp/pcre-wheel/*.whl || exit 1
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --no-build-isolation \
    --upgrade --target "$SITE" . || exit 1
  touch "$SITE/.edgeqra-installed"
  echo "installed into $SITE in $(( $(date +%s) - t0 )) s"
fi
export PYTHONPATH=$SITE
python3 - <<'PY' || exit 1
import torch, transformers, peft, gptqmodel, edgeqra.measure
print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__,
      "gptqmodel", gptqmodel.__version__, "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
PY
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
[ "${1:-}" = "--install-only" ] && exit 0

arch=${1:-small}
shift || true
tag=${arch//,/_}
# The grid's time limit is what is left of a 600 s call after the install, less ~60 s for
# Python imports and the last config's table (BUDGET overrides; a later --time-limit wins).
limit=$(( ${BUDGET:-540} - ($(date +%s) - start) ))
python3 bench/memory_truth.py --arch "$arch" --time-limit "$limit" \
  --out "$OUT/memory_truth_${tag}.json" "$@" 2>&1 \
  | grep -v -E '^(INFO|WARN|W[0-9]{4})' | tee "$OUT/memory_truth_${tag}.log"
