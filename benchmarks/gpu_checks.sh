#!/usr/bin/env bash
# The GPU checks of this project, in one script, for a machine with an NVIDIA GPU:
#
#     bash benchmarks/gpu_checks.sh OUTDIR
#
# 1. installs what the GPU machine lacks, offline, from ./wheels (if that folder is there);
# 2. python -m pytest tests/gpu -v -s            (NVML, real CUDA memory, release waits)
# 3. python -m benchmarks.switch_gpu --json OUTDIR/switch_gpu.json
#    (the real SDXL architecture, random weights, fp16: cold load, offload, restore, drop;
#    restore against the pinned link measured in the same run)
# 4. python -m benchmarks.cold_load OUTDIR/cold-scratch --device cuda --repeats 2
#    (the same architecture from the packed disk cache straight to the GPU, against
#    from_pretrained and max(read, copy) measured in the same run)
# Everything printed goes to OUTDIR/gpu_checks.log too; each step's exit status is in
# OUTDIR/status.txt. The script goes on after a failed step and exits 1 if any failed.
#
# On a GPU machine without network access that has torch, transformers, nvidia-ml-py, pytest,
# hypothesis, anyio and httpx but not diffusers, transitions, peft or this package, put the
# missing wheels in ./wheels of the working tree first (about 20 MB), for example:
#
#     pip download --no-deps -d wheels diffusers==0.42.1 transitions six peft accelerate psutil \
#         prometheus-client pytest-timeout importlib-metadata zipp pyyaml "setuptools>=77"
#     for v in 3.10 3.11 3.12 3.13; do   # Pillow (and pyyaml) are built per Python version
#         pip download --no-deps --only-binary=:all: --python-version $v \
#             --platform manylinux2014_x86_64 -d wheels pillow pyyaml; done
#
# Expect about 6-8 minutes: tests/gpu, then the switch benchmark (building and saving 6.46 GiB
# of random weights, pinning 2 x 8 GiB of host memory, the copies), then the cold loads
# (building and saving the weights again, writing the cache entry, two rounds of loads).

set -uo pipefail

OUT=${1:?usage: bash benchmarks/gpu_checks.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PYTHON:-python}
LOG="$OUT/gpu_checks.log"
: > "$OUT/status.txt"
exec > >(tee -a "$LOG") 2>&1

failed=0
step() {  # step NAME COMMAND...: run it, record its exit status, go on
    local name=$1
    shift
    echo
    echo "=== $name: $* ($(date -u +%H:%M:%S) UTC)"
    "$@"
    local rc=$?
    echo "$name $rc" >> "$OUT/status.txt"
    echo "=== $name: exit $rc"
    [ "$rc" -eq 0 ] || failed=1
    return 0
}

echo "gpu checks: $REPO -> $OUT; $(date -u '+%Y-%m-%d %H:%M:%S') UTC"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,pcie.link.gen.current,pcie.link.width.current \
    --format=csv 2>&1 || echo "(nvidia-smi failed)"
$PY -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "available", torch.cuda.is_available())'

# -- 1. dependencies, offline ------------------------------------------------------------------
need_deps() {
    $PY - <<'EOF'
import importlib.util, sys
missing = [m for m in ("diffusers", "transitions", "yaml", "prometheus_client", "pytest_timeout", "PIL")
           if importlib.util.find_spec(m) is None]
print("missing modules:", " ".join(missing) or "none")
sys.exit(1 if missing else 0)
EOF
}
install_wheels() {
    if [ ! -d wheels ] || ! ls wheels/*.whl > /dev/null 2>&1; then
        echo "no ./wheels folder with wheels: cannot install what is missing (see this script's header)"
        return 1
    fi
    local wheels=(wheels/*.whl)
    # Resolved against what is installed plus ./wheels; a wheel for another Python is skipped.
    if ! $PY -m pip install --no-index --find-links wheels diffusers transitions prometheus-client \
        pytest-timeout pyyaml pillow; then
        echo "resolved install failed; installing the wheels one by one without dependencies"
        for w in "${wheels[@]}"; do
            $PY -m pip install --no-index --no-deps "$w" || echo "  skipped $w"
        done
    fi
    # peft (LoRA) is not needed by these checks: installed when its wheels are there
    $PY -m pip install --no-index --find-links wheels peft || echo "(peft not installed: not needed here)"
    need_deps
}
if ! need_deps; then
    step install-wheels install_wheels
fi
# This package: editable, without touching its dependencies; where that cannot build offline,
# the repository on PYTHONPATH does the same for `python -m` from the repository root.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
if ! $PY -c 'import importlib.metadata as m; m.version("vram-orchestrator")' 2> /dev/null; then
    $PY -m pip install --no-index --find-links wheels --no-deps -e . \
        || $PY -m pip install --no-deps --no-build-isolation -e . \
        || echo "(editable install failed: using PYTHONPATH=$REPO)"
fi
$PY -m pip list 2> /dev/null | grep -iE "^(torch|diffusers|transformers|nvidia-ml-py|pytest|anyio|transitions|vram)" || true

# -- 2. the GPU tests ---------------------------------------------------------------------------
step pytest-gpu $PY -m pytest tests/gpu -v -s -p no:cacheprovider

# -- 3. the switch benchmark on the real SDXL architecture -----------------------------------------
step switch-gpu $PY -m benchmarks.switch_gpu --json "$OUT/switch_gpu.json"

# -- 4. cold loads from the packed disk cache onto the GPU ---------------------------------------
step cold-load-gpu $PY -m benchmarks.cold_load "$OUT/cold-scratch" --device cuda --repeats 2 \
    --json "$OUT/cold_load_gpu.json"
rm -rf "$OUT/cold-scratch"  # 13 GB of scratch (the model and its cache entry) need not come back

echo
echo "status:"
cat "$OUT/status.txt"
exit $failed
