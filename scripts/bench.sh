#!/usr/bin/env bash
# Side-by-side throughput benchmark: masklm (examples/bench.rs) on each backend asked for against
# transformers + PyTorch (scripts/bench_hf.py), same shapes, batch, masking and AdamW settings,
# fp32, 2 threads, in one run on this machine. Needs the reference venv
# (scripts/requirements.txt) at $VENV, default /var/tmp/masklm-venv.
#   bash scripts/bench.sh                      # default CPU backend, small and base-shaped
#   BACKENDS="cpu tch" bash scripts/bench.sh   # also libtorch (CPU), from $VENV's torch wheel
#   CONFIGS=small BACKENDS="cpu tch wgpu" DEVICE_tch=cuda:0 bash scripts/bench.sh
#   PRECISION=bf16 ...                         # mixed precision on both sides (torch.autocast)
#   HF_DEVICE=cuda:0 ...                       # transformers on a GPU (scripts/gpu-check.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/var/tmp/masklm-venv}
THREADS=${THREADS:-2}
BACKENDS=${BACKENDS:-cpu}
CONFIGS=${CONFIGS:-small base}
PRECISION=${PRECISION:-f32}
HF_DEVICE=${HF_DEVICE:-cpu}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/masklm-target}"
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS
features=()
for b in $BACKENDS; do
  case $b in
    cpu) ;;
    wgpu) features+=(wgpu) ;;
    tch)
      features+=(tch)
      # libtorch from the torch wheel in $VENV (scripts/setup-libtorch.sh explains the options).
      LIBTORCH=${LIBTORCH:-$("$VENV/bin/python" -c "import os, torch; print(os.path.dirname(torch.__file__))")}
      export LIBTORCH ;;
    *) echo "bench: unknown backend $b (cpu, wgpu, tch)" >&2; exit 2 ;;
  esac
done
# FEATURES overrides the Cargo features (e.g. FEATURES=wgpu,tch reuses the build CI makes).
feature_list=${FEATURES:-$(IFS=,; echo "${features[*]:-}")}
cargo build --release -q -p masklm --example bench ${feature_list:+--features "$feature_list"}
bench="$CARGO_TARGET_DIR/release/examples/bench"

small="--hidden 256 --layers 4 --heads 4 --ffn 1024 --vocab 8192 --seq 128 --batch 16 --steps 20 --warmup 3"
base="--hidden 768 --layers 12 --heads 12 --ffn 3072 --vocab 50265 --seq 128 --batch 8 --steps 3 --warmup 1"

field() { sed -E "s/.*$1=([0-9.]+).*/\1/" <<<"$2"; }
rows=()
results=()
label() { case $1 in cpu) echo 'masklm (flex, CPU)' ;; tch) echo "masklm (libtorch, ${DEVICE_tch:-cpu})" ;; wgpu) echo "masklm (wgpu, ${DEVICE_wgpu:-auto})" ;; esac; }
for name in $CONFIGS; do
  args=${!name}
  # shellcheck disable=SC2086
  hf=$("$VENV/bin/python" scripts/bench_hf.py $args --threads "$THREADS" --device "$HF_DEVICE" \
    --precision "$PRECISION" 2>/dev/null)
  gflops=$(field matmul_gflops "$hf")
  for b in $BACKENDS hf; do
    if [[ $b == hf ]]; then
      line=$hf
    else
      dev_var=DEVICE_$b
      # shellcheck disable=SC2086
      if ! line=$("$bench" $args --backend "$b" ${!dev_var:+--device "${!dev_var}"} --precision "$PRECISION"); then
        rows+=("| $name | $(label "$b") | failed (see above) | | | |")
        continue
      fi
      params=$(field params "$line")
      results+=("$(awk -v a="$(field train_tps "$line")" -v b="$(field train_tps "$hf")" \
        -v c="$(field eval_tps "$line")" -v d="$(field eval_tps "$hf")" \
        -v e="$(field rss_mb "$line")" -v f="$(field rss_mb "$hf")" -v n="$name" -v k="$b" -v p="$PRECISION" \
        'BEGIN{printf "RESULT config=%s backend=%s train_ratio=%.2f eval_ratio=%.2f rss_ratio=%.2f precision=%s", n, (k == "cpu" ? "flex" : k), a/b, c/d, e/f, p}')")
    fi
    t=$(field train_tps "$line"); e=$(field eval_tps "$line"); r=$(field rss_mb "$line")
    # Model FLOPs utilisation: ~6 x parameters x tokens per second against the matmul peak.
    mfu=$(awk -v p="$params" -v t="$t" -v g="$gflops" 'BEGIN{printf "%.1f", 100*6*p*t/(g*1e9)}')
    rows+=("$(printf '| %-5s | %-26s | %10.0f | %10.0f | %8.0f | %6s%% |' "$name" "$([[ $b == hf ]] && echo 'transformers+PyTorch' || label "$b")" "$t" "$e" "$r" "$mfu")")
  done
done
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), fp32 matmul peak ${gflops} GFLOP/s (torch on $HF_DEVICE, $THREADS threads); precision $PRECISION"
echo "| config | implementation | train tok/s | eval tok/s | peak RSS MB | MFU |"
echo "|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
printf '%s\n' "${results[@]}"
