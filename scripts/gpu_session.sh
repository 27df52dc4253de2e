#!/usr/bin/env bash
# Every GPU check in one run, for a session that is lent a CUDA machine (a short device lease: one call, ~8 min).
#
#   bash scripts/gpu_session.sh            # from the repository root, on the GPU machine
#
# 1. the environment (nvidia-smi, torch / triton / cupy versions);
# 2. `pytest -m gpu` over the files that hold GPU tests: Triton and CUDA kernels against the reference, Philox on
#    the device, the whole-loop CUDA graph (graph == eager, no host sync, one launch per step), the drop-ins;
# 3. benchmarks/bench_step_gpu.py: each step kernel's fraction of the device's copy bandwidth (16M elements);
# 4. benchmarks/bench_e2e.py --device cuda: fastdiff's graphed loop vs diffusers' eager loop, 4 and 25 steps, with
#    the digits UNet and a random diffusers UNet2DModel (sampler_share at 4 steps).
# Logs and JSON go to $OUT (the device tool brings that folder back; default /tmp/fastdiff-gpu); commit the JSON
# under benchmarks/results/<gpu>/ with the device named.
#
# The machine's python3 has torch, triton, cupy, numpy, scipy, pytest and hypothesis but no diffusers: without it
# the diffusers tests skip and the e2e benchmark cannot run.  Carry it as wheels: here, in the repository root,
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata
# and name .whl in the call's carry; this script installs what it finds there.
set -uo pipefail
OUT=${OUT:-/tmp/fastdiff-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

step() { echo; echo "=== $* ($(date +%T))"; }

step environment
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
torch.cuda.get_device_name(0))"
  python3 -c "import cupy; print('cupy', cupy.__version__)" || echo "cupy missing: the cuda backend cannot load"
  python3 -c "import diffusers; print('diffusers', diffusers.__version__)" || echo "diffusers missing (see above)"
} 2>&1 | tee "$OUT/env.txt"

step "pytest -m gpu"
timeout 330 python3 -m pytest -q -m gpu -p no:cacheprovider -o addopts="" --durations=10 \
  tests/test_kernel_cuda.py tests/test_kernel_triton.py tests/test_rng.py tests/test_guidance_modes.py \
  tests/test_integration_diffusers.py >"$OUT/gpu_tests.log" 2>&1
echo "pytest exit $?"; tail -n 40 "$OUT/gpu_tests.log"

step bench_step_gpu
timeout 120 python3 benchmarks/bench_step_gpu.py --out "$OUT" >"$OUT/step_gpu.log" 2>&1
echo "bench_step_gpu exit $?"; tail -n 25 "$OUT/step_gpu.log"

step "bench_e2e --device cuda"
timeout 240 python3 benchmarks/bench_e2e.py --device cuda --steps 4,25 --no-compile --out "$OUT/e2e.json" \
  >"$OUT/e2e.log" 2>&1
echo "bench_e2e exit $?"; tail -n 15 "$OUT/e2e.log"
step done
