#!/usr/bin/env bash
# Side-by-side throughput benchmark: masklm (examples/bench.rs, default CPU backend) against
# transformers + PyTorch (scripts/bench_hf.py), same shapes, batch, masking and AdamW settings,
# fp32, 2 threads, in one run on this machine. Needs the reference venv
# (scripts/requirements.txt) at $VENV, default /var/tmp/masklm-venv.
#   bash scripts/bench.sh            # small and base-shaped configs
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/var/tmp/masklm-venv}
THREADS=${THREADS:-2}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/masklm-target}"
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS
cargo build --release -q -p masklm --example bench
bench="$CARGO_TARGET_DIR/release/examples/bench"

small="--hidden 256 --layers 4 --heads 4 --ffn 1024 --vocab 8192 --seq 128 --batch 16 --steps 20 --warmup 3"
base="--hidden 768 --layers 12 --heads 12 --ffn 3072 --vocab 50265 --seq 128 --batch 8 --steps 3 --warmup 1"

field() { sed -E "s/.*$1=([0-9.]+).*/\1/" <<<"$2"; }
rows=()
results=()
for name in small base; do
  args=${!name}
  # shellcheck disable=SC2086
  ours=$("$bench" $args)
  # shellcheck disable=SC2086
  hf=$("$VENV/bin/python" scripts/bench_hf.py $args --threads "$THREADS" 2>/dev/null)
  gflops=$(field matmul_gflops "$hf")
  params=$(field params "$ours")
  for side in masklm hf; do
    line=$([[ $side == masklm ]] && echo "$ours" || echo "$hf")
    t=$(field train_tps "$line"); e=$(field eval_tps "$line"); r=$(field rss_mb "$line")
    # Model FLOPs utilisation: ~6 x parameters x tokens per second against the matmul peak.
    mfu=$(awk -v p="$params" -v t="$t" -v g="$gflops" 'BEGIN{printf "%.1f", 100*6*p*t/(g*1e9)}')
    rows+=("$(printf '| %-5s | %-22s | %10.0f | %10.0f | %8.0f | %6s%% |' "$name" "$([[ $side == masklm ]] && echo 'masklm (flex, CPU)' || echo 'transformers+PyTorch')" "$t" "$e" "$r" "$mfu")")
  done
  results+=("$(awk -v a="$(field train_tps "$ours")" -v b="$(field train_tps "$hf")" \
    -v c="$(field eval_tps "$ours")" -v d="$(field eval_tps "$hf")" \
    -v e="$(field rss_mb "$ours")" -v f="$(field rss_mb "$hf")" -v n="$name" \
    'BEGIN{printf "RESULT config=%s backend=flex train_ratio=%.2f eval_ratio=%.2f rss_ratio=%.2f", n, a/b, c/d, e/f}')")
done
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), fp32 matmul peak ${gflops} GFLOP/s (torch, $THREADS threads)"
echo "| config | implementation | train tok/s | eval tok/s | peak RSS MB | MFU |"
echo "|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
printf '%s\n' "${results[@]}"
