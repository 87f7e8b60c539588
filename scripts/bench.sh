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
#   ROUNDS=5 ...                               # rounds per side (default 3; medians printed)
#   ATTENTION=eager ...                        # masklm without the fused attention kernel
#   BENCH=path/to/bench ...                    # a prebuilt benchmark binary (no cargo)
#   SIDE_TIMEOUT=300 ...                       # seconds per measurement (a slow side fails alone)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/var/tmp/masklm-venv}
PYTHON=${PYTHON:-$VENV/bin/python}
THREADS=${THREADS:-2}
BACKENDS=${BACKENDS:-cpu}
CONFIGS=${CONFIGS:-small base}
PRECISION=${PRECISION:-f32}
HF_DEVICE=${HF_DEVICE:-cpu}
ROUNDS=${ROUNDS:-3}
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
      LIBTORCH=${LIBTORCH:-$("$PYTHON" -c "import os, torch; print(os.path.dirname(torch.__file__))")}
      export LIBTORCH ;;
    cuda) features+=(cuda) ;;
    *) echo "bench: unknown backend $b (cpu, wgpu, cuda, tch)" >&2; exit 2 ;;
  esac
done
# FEATURES overrides the Cargo features (e.g. FEATURES=wgpu,tch reuses the build CI makes).
feature_list=${FEATURES:-$(IFS=,; echo "${features[*]:-}")}
if [[ -n ${BENCH:-} ]]; then
  bench=$BENCH
else
  cargo build --release -q -p masklm --example bench ${feature_list:+--features "$feature_list"}
  bench="$CARGO_TARGET_DIR/release/examples/bench"
fi

small="--hidden 256 --layers 4 --heads 4 --ffn 1024 --vocab 8192 --seq 128 --batch 16 --steps 20 --warmup 3"
base="--hidden 768 --layers 12 --heads 12 --ffn 3072 --vocab 50265 --seq 128 --batch 8 --steps 3 --warmup 1"

# The roberta-base shape at the GPU check's two block lengths (scripts/gpu-check.sh).
b128="--hidden 768 --layers 12 --heads 12 --ffn 3072 --vocab 50265 --seq 128 --batch 64 --steps 10 --warmup 3"
b512="--hidden 768 --layers 12 --heads 12 --ffn 3072 --vocab 50265 --seq 512 --batch 16 --steps 10 --warmup 3"
# ModernBERT: a small shape, and ModernBERT-base (22 layers, GeGLU 1152, window 128, global
# every 3rd layer) at 128 and 512 tokens; mb1024/mb2048 for the growth with length.
# CONFIGS="mbsmall mb128 mb512" bash scripts/bench.sh
mbsmall="--model-type modernbert --hidden 256 --layers 6 --heads 4 --ffn 512 --vocab 8192 --seq 256 --batch 8 --steps 10 --warmup 2 --window 64"
mb128="--model-type modernbert --hidden 768 --layers 22 --heads 12 --ffn 1152 --vocab 50368 --seq 128 --batch 8 --steps 3 --warmup 1"
mb512="--model-type modernbert --hidden 768 --layers 22 --heads 12 --ffn 1152 --vocab 50368 --seq 512 --batch 2 --steps 3 --warmup 1"
mb1024="--model-type modernbert --hidden 768 --layers 22 --heads 12 --ffn 1152 --vocab 50368 --seq 1024 --batch 1 --steps 2 --warmup 1"
mb2048="--model-type modernbert --hidden 768 --layers 22 --heads 12 --ffn 1152 --vocab 50368 --seq 2048 --batch 1 --steps 2 --warmup 1"
GPU_MEM=${GPU_MEM:-0}
# SIDE_TIMEOUT=S: each measurement gets S seconds; one that runs over is a "failed" row and the
# other rows still print (scripts/gpu-check.sh sets it).
guard=${SIDE_TIMEOUT:+timeout --kill-after=10 $SIDE_TIMEOUT}

field() { sed -E "s/.*$1=([0-9.]+).*/\1/" <<<"$2"; }
median() { sort -g | awk '{v[NR]=$1} END{print (NR%2 ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2)}'; }
label() { case $1 in cpu) echo 'masklm (flex, CPU)' ;; tch) echo "masklm (libtorch, ${DEVICE_tch:-cpu})" ;; wgpu) echo "masklm (wgpu, ${DEVICE_wgpu:-auto})" ;; cuda) echo "masklm (cuda, ${DEVICE_cuda:-0})" ;; esac; }
# One measurement of side $1 (a backend or hf) on config $2: its MASKLM_BENCH line, plus
# gpu_mb=(peak GPU memory in use while it ran, minus before) with GPU_MEM=1.
measure() {
  if [[ $GPU_MEM == 1 ]]; then
    local log base line status
    log=$(mktemp)
    base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 >"$log" &
    local sampler=$!
    line=$(measure_once "$@"); status=$?
    kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null
    echo "$line gpu_mb=$(sort -g "$log" | tail -1 | awk -v b="$base" '{print $1 - b}')"
    rm -f "$log"
    return $status
  fi
  measure_once "$@"
}
measure_once() {
  local b=$1 args=${!2}
  if [[ $b == hf ]]; then
    # shellcheck disable=SC2086
    $guard "$PYTHON" scripts/bench_hf.py $args --threads "$THREADS" --device "$HF_DEVICE" \
      --precision "$PRECISION" 2>/dev/null
  else
    local dev_var=DEVICE_$b
    # shellcheck disable=SC2086
    $guard "$bench" $args --backend "$b" ${!dev_var:+--device "${!dev_var}"} --precision "$PRECISION" \
      ${ATTENTION:+--attention "$ATTENTION"}
  fi
}
rows=()
results=()
declare -A lines
for name in $CONFIGS; do
  sides=(hf $BACKENDS)
  # ROUNDS rounds, the order of the sides reversed every other round, so that neither side
  # always runs first (warm caches, a busy neighbour); each figure is the median of the rounds.
  for ((round = 1; round <= ROUNDS; round++)); do
    order=("${sides[@]}")
    if ((round % 2 == 0)); then
      order=(); for ((i = ${#sides[@]} - 1; i >= 0; i--)); do order+=("${sides[i]}"); done
    fi
    for b in "${order[@]}"; do
      if line=$(measure "$b" "$name"); then
        lines[$name.$b]+="$line"$'\n'
        echo "round $round $name $b: $line" >&2
      else
        echo "round $round $name $b: failed" >&2
      fi
    done
  done
  med() { grep -o "$1=[0-9.]*" <<<"${lines[$name.$2]:-}" | cut -d= -f2 | median; }
  hf_train=$(med train_tps hf); hf_eval=$(med eval_tps hf); hf_rss=$(med rss_mb hf)
  gflops=$(med matmul_gflops hf)
  params=$(med params hf)  # the same model on both sides
  for b in $BACKENDS hf; do
    if [[ -z ${lines[$name.$b]:-} ]]; then
      rows+=("| $name | $(label "$b") | failed (see above) | | | |")
      continue
    fi
    t=$(med train_tps "$b"); e=$(med eval_tps "$b"); r=$(med rss_mb "$b")
    if [[ $b != hf ]]; then
      results+=("$(awk -v a="$t" -v b="$hf_train" -v c="$e" -v d="$hf_eval" -v e="$r" -v f="$hf_rss" \
        -v n="$name" -v k="$b" -v p="$PRECISION" -v rounds="$ROUNDS" \
        'BEGIN{printf "RESULT config=%s backend=%s train_ratio=%.2f eval_ratio=%.2f rss_ratio=%.2f precision=%s rounds=%d", n, (k == "cpu" ? "flex" : k), a/b, c/d, e/f, p, rounds}')")
    fi
    # Model FLOPs utilisation: ~6 x parameters x tokens per second against the matmul peak.
    mfu=$(awk -v p="${params:-0}" -v t="$t" -v g="$gflops" 'BEGIN{printf "%.1f", 100*6*p*t/(g*1e9)}')
    row=$(printf '| %-5s | %-26s | %10.0f | %10.0f | %8.0f | %6s%% |' "$name" "$([[ $b == hf ]] && echo 'transformers+PyTorch' || label "$b")" "$t" "$e" "$r" "$mfu")
    [[ $GPU_MEM == 1 ]] && row+=" $(med gpu_mb "$b") |"
    rows+=("$row")
  done
done
# Machines of one kind differ in SIMD width (gemm's AVX-512 vs AVX2 kernels): say which.
simd=$(grep -qm1 avx512f /proc/cpuinfo && echo AVX-512 || { grep -qm1 avx2 /proc/cpuinfo && echo AVX2 || echo "no AVX2"; })
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) ($simd), fp32 matmul peak ${gflops} GFLOP/s (torch on $HF_DEVICE, $THREADS threads); precision $PRECISION; median of $ROUNDS rounds, sides alternating"
if [[ $GPU_MEM == 1 ]]; then
  echo "| config | implementation | train tok/s | eval tok/s | peak RSS MB | MFU | peak GPU MB |"
  echo "|---|---|---|---|---|---|---|"
else
  echo "| config | implementation | train tok/s | eval tok/s | peak RSS MB | MFU |"
  echo "|---|---|---|---|---|---|"
fi
printf '%s\n' "${rows[@]}"
printf '%s\n' "${results[@]}"
