#!/usr/bin/env bash
# GPU check on an NVIDIA machine, in a few minutes once built: the cross-backend parity tests
# with libtorch on CUDA and wgpu on the NVIDIA Vulkan driver, then the throughput benchmark
# (small and base-shaped, f32 and bf16) beside transformers + PyTorch on the same GPU.
#
#   bash scripts/gpu-check.sh            # prints the figures; paste them into BENCHMARKS.md
#
# Needs: the NVIDIA driver; the Rust toolchain; torch==2.9.0 with CUDA (scripts/requirements.txt
# in $VENV, default /var/tmp/masklm-venv: it also runs the transformers side); for wgpu, the
# Vulkan loader (libvulkan.so.1, Debian `libvulkan1`) and the driver's Vulkan ICD. A missing
# part is reported and its rows skipped, not silently passed.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/var/tmp/masklm-venv}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/masklm-target}"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
start=$(date +%s)
say() { echo "gpu-check [$(( $(date +%s) - start )) s]: $*"; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || {
  say "no NVIDIA GPU visible (nvidia-smi failed)"; exit 1; }

backends=()
if "$VENV/bin/python" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
  LIBTORCH=$("$VENV/bin/python" -c "import os, torch; print(os.path.dirname(torch.__file__))")
  export LIBTORCH LD_LIBRARY_PATH="$LIBTORCH/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  backends+=(tch)
else
  say "skipping tch: $VENV has no CUDA-enabled torch (pip install -r scripts/requirements.txt)"
fi
if ldconfig -p | grep -q 'libvulkan.so.1'; then
  backends+=(wgpu)
else
  say "skipping wgpu: no Vulkan loader (apt-get install libvulkan1)"
fi
[[ ${#backends[@]} -gt 0 ]] || { say "nothing to check"; exit 1; }

features=$(IFS=,; echo "${backends[*]}")
say "building with features $features"
cargo build --release -q -p masklm --features "$features" --example bench --bin masklm || exit 1
cargo test --release -q -p masklm --features "$features" --test backends --no-run || exit 1

# The parity tests on the GPU devices (tests/backends.rs reads these).
export MASKLM_TEST_DEVICE_TCH=cuda:0 MASKLM_TEST_DEVICE_WGPU=discrete
say "parity tests"
cargo test --release -q -p masklm --features "$features" --test backends -- --nocapture 2>&1 \
  | grep -E 'diff|within|perplexity|test result|panicked|error'

say "throughput"
for precision in f32 bf16; do
  PRECISION=$precision HF_DEVICE=cuda:0 DEVICE_tch=cuda:0 DEVICE_wgpu=discrete \
    BACKENDS="${backends[*]}" bash scripts/bench.sh
done
say "done"
