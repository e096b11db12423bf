#!/usr/bin/env bash
# Run HERE (the dev machine, which reaches PyPI), from anywhere: put into .whl/ (git-ignored
# through .git/info/exclude, never committed) every package the GPU machine lacks for
# edgeqra's GPTQModel paths. The GPU image already has torch 2.11, transformers, peft,
# accelerate, safetensors, rich, numpy, triton, nvidia-ml-py; it has no internet.
#
#   bash bench/gpu/fetch_wheels.sh        # ~1-2 min; prints the list and the total size
#
# Targets CPython 3.12, manylinux x86_64 (the GPU machine), per /work/.library/device/README.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .git/info .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PY=${PYTHON:-.venv/bin/python}
PLATFORMS=(--python-version 3.12 --implementation cp
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

# 1. On PyPI as wheels that run on 3.12 x86_64 (torchao: cp310-abi3; the others pure Python).
#    torchao is imported by gptqmodel at import time; optimum by peft's GPTQ support;
#    platformdirs by edgeqra.profiles; torch-pruning by `edgeqra prune` (bench/prune_quality.py).
"$PY" -m pip download -q --no-deps --only-binary=:all: "${PLATFORMS[@]}" -d .whl \
  torchao==0.18.0 optimum==2.3.0 platformdirs==4.14.8 torch-pruning==1.6.1

# 2. Pure-Python packages that PyPI ships only as sdists: build py3-none-any wheels here.
#    (gptqmodel's CUDA kernels are sources inside the wheel, JIT-compiled on first use there.)
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl \
  gptqmodel==7.6.0 Defuser==0.0.28 Device-SMI==0.5.7 LogBar==0.4.15 TokeNicer==0.0.14

# 3. PyPcre has a C extension and no wheel: carry its sdist; run_*.sh builds it there
#    (gcc, against the system libpcre2-8 found by ldconfig; its header ships in the sdist).
"$PY" -m pip download -q --no-deps --no-binary=:all: --no-build-isolation -d .whl PyPcre==0.6.4

# Every wheel must install on CPython 3.12 x86_64: pure, abi3 or cp312, never cp311.
bad=$(ls .whl/*.whl | grep -v -E -- '-(py3-none-any|cp3[0-9]+-abi3-manylinux[^/]*x86_64|cp312-cp312-manylinux[^/]*x86_64)\.whl$' || true)
if [ -n "$bad" ]; then echo "wheels that will not install there: $bad" >&2; exit 1; fi
# One version of each package (two stop the install there).
dups=$(ls .whl | sed -E 's/-[0-9].*//' | tr 'A-Z_' 'a-z-' | sort | uniq -d)
if [ -n "$dups" ]; then echo "several versions of: $dups (remove the extra ones from .whl/)" >&2; exit 1; fi
ls -la .whl
du -sh .whl
