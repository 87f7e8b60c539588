#!/usr/bin/env bash
# Builds here everything scripts/gpu-check.sh needs on a GPU machine that has only the NVIDIA
# driver and a Python with torch + transformers (no Rust toolchain, no Vulkan loader, no
# network): release binaries of `masklm` and the benchmark (stripped, xz), the test fixtures the
# checks read, the benchmark scripts, and the Vulkan loader .deb. One folder, under 60 MB.
#
#   bash scripts/gpu-bundle.sh [OUT]     # default OUT: gpu-bundle/ (git-ignored)
#   # copy OUT to the GPU machine, then there:  bash OUT/scripts/gpu-check.sh
#
# Backends: wgpu always; cuda when it builds. burn 0.22's cuda backend (cubecl-cuda 0.11)
# compiles cubecl-llvm, whose build script downloads a prebuilt LLVM 23.1 from
# github.com/tracel-ai/tracel-llvm: on a machine that reaches only package registries the cuda
# build fails, and the bundle says so and carries wgpu only. FEATURES=wgpu skips the attempt.
# libtorch (tch) is not bundled: a binary built against torch 2.9 cannot use another torch.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-bundle}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/masklm-gpu-target}"
say() { echo "gpu-bundle: $*" >&2; }

features=${FEATURES:-cuda,wgpu}
build() { cargo build --release -q -p masklm --features "$1" --bin masklm --example bench; }
if ! build "$features" 2>"$CARGO_TARGET_DIR.log"; then
  if [[ $features == *cuda* ]] && grep -q "tracel-llvm\|failed to lookup address" "$CARGO_TARGET_DIR.log"; then
    say "the cuda backend did not build: cubecl-llvm downloads LLVM from github.com/tracel-ai/tracel-llvm, unreachable here; bundling wgpu only"
    features=wgpu
    build "$features"
  else
    cat "$CARGO_TARGET_DIR.log" >&2
    exit 1
  fi
fi

rm -rf "$out"
mkdir -p "$out/bin" "$out/scripts" "$out/tests/fixtures" "$out/debs"
for exe in release/masklm release/examples/bench; do
  name=$(basename "$exe")
  strip -o "$out/bin/$name" "$CARGO_TARGET_DIR/$exe"
  xz -T0 -6 "$out/bin/$name"
done
echo "$features" >"$out/bin/FEATURES"
git rev-parse HEAD >"$out/bin/COMMIT" 2>/dev/null || true
cp scripts/gpu-check.sh scripts/bench.sh scripts/bench_hf.py "$out/scripts/"
for f in roberta-tiny bert-tiny tokenizer-go tokenizer-corpus.txt; do
  cp -r "tests/fixtures/$f" "$out/tests/fixtures/"
done
# The Vulkan loader (the NVIDIA driver brings the ICD but, on a bare machine, no loader).
(cd "$out/debs" && apt-get download libvulkan1 >/dev/null) || say "could not download libvulkan1: wgpu will need the GPU machine's own loader"
size=$(du -sm "$out" | cut -f1)
say "$out: ${size} MB, backends $features"
if ((size >= 60)); then
  say "the bundle is over 60 MB"
  exit 1
fi
