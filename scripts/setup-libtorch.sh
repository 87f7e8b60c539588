#!/usr/bin/env bash
# Sets up libtorch 2.9.0 for masklm's `tch` backend from the PyPI torch==2.9.0 wheel (the one
# libtorch burn-tch 0.22.1 accepts) and builds masklm with it.
#
#   bash scripts/setup-libtorch.sh               # CUDA-capable install (~4 GB download, 7 GB on disk)
#   bash scripts/setup-libtorch.sh --cpu-only    # CPU only (~0.9 GB), for machines without NVIDIA GPUs
#   bash scripts/setup-libtorch.sh --python /path/to/venv/bin/python   # reuse a torch==2.9.0 install
#
# Options: --venv DIR (default /var/tmp/masklm-libtorch-venv), --no-build.
# The build bakes libtorch's library folder into the binary as an rpath (crates/masklm/build.rs),
# so `target/release/masklm --backend tch [--device cuda:0]` needs no LD_LIBRARY_PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=/var/tmp/masklm-libtorch-venv
python=""
cpu_only=0
build=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cpu-only) cpu_only=1 ;;
    --venv) venv="$2"; shift ;;
    --python) python="$2"; shift ;;
    --no-build) build=0 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "setup-libtorch: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

torch_version=2.9.0
has_torch() { "$1" -c "import importlib.metadata as m; assert m.version('torch').split('+')[0] == '$torch_version'" 2>/dev/null; }

if [[ -z "$python" ]]; then
  python="$venv/bin/python"
  if ! has_torch "$python"; then
    python3 -m venv "$venv"
    if [[ $cpu_only == 1 ]]; then
      # torch without its CUDA dependencies; libtorch_cpu still links the CUDA runtime and CUPTI
      # (kineto), so those two small wheels come along.
      "$venv/bin/pip" install --quiet --no-deps "torch==$torch_version" \
        nvidia-cuda-runtime-cu12==12.8.90 nvidia-cuda-cupti-cu12==12.8.90
    else
      "$venv/bin/pip" install --quiet "torch==$torch_version"
    fi
  fi
fi
if ! has_torch "$python"; then
  echo "setup-libtorch: $python has no torch==$torch_version" >&2
  exit 1
fi
torch_dir=$("$python" -c "import os, importlib.util as u; print(os.path.dirname(u.find_spec('torch').origin))")

libtorch="$torch_dir"
if [[ ! -e "$torch_dir/lib/libtorch_cuda.so" ]] || [[ $cpu_only == 1 ]]; then
  # Without the CUDA libraries, linking the wheel's libtorch.so (which needs libtorch_cuda.so)
  # fails. Give torch-sys a libtorch folder whose lib/ has only the CPU libraries and an empty
  # libtorch.so; build.rs points the rpath at the real torch/lib.
  libtorch="$(dirname "$python")/../libtorch-cpu"
  mkdir -p "$libtorch/lib"
  ln -sfn "$torch_dir/include" "$libtorch/include"
  for lib in libtorch_cpu.so libc10.so libgomp.so.1 libshm.so; do
    ln -sfn "$torch_dir/lib/$lib" "$libtorch/lib/$lib"
  done
  if [[ ! -e "$libtorch/lib/libtorch.so" ]]; then
    echo > "$libtorch/lib/empty.c"
    gcc -shared -o "$libtorch/lib/libtorch.so" "$libtorch/lib/empty.c"
  fi
  libtorch=$(cd "$libtorch" && pwd)
fi

echo "setup-libtorch: LIBTORCH=$libtorch"
if [[ $build == 1 ]]; then
  LIBTORCH="$libtorch" cargo build --release -p masklm --features tch
  echo "setup-libtorch: built; try: target/release/masklm --backend tch fill-mask --model tests/fixtures/roberta-tiny 'The <mask> binds.'"
  echo "  (CARGO_TARGET_DIR, when set, holds the binary instead of target/)"
else
  echo "setup-libtorch: build with: LIBTORCH=$libtorch cargo build --release -p masklm --features tch"
fi
