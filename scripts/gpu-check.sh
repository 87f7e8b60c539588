#!/usr/bin/env bash
# The GPU check, run from a bundle that scripts/gpu-bundle.sh made (no Rust toolchain needed):
# on a machine with the NVIDIA driver and a Python with torch + transformers (any versions).
#
#   bash gpu-bundle/scripts/gpu-check.sh      # writes gpu-bundle/gpu-check-results.md
#
# 1. each GPU backend in the bundle (cuda, wgpu) against the CPU backend on the test fixtures:
#    fill-mask top-5 (scores within 1e-4), perplexity (1e-4 relative), a 20-step training run
#    (losses within 1e-3, dropout off: backends draw dropout masks from their own generators);
# 2. the throughput table beside transformers + PyTorch on the same GPU: roberta-base shape,
#    blocks of 128 x batch 64 and 512 x batch 16, f32 and bf16 (scripts/bench.sh, one round:
#    device time is short; peak GPU memory sampled with nvidia-smi).
# Every step runs under a timeout and appends to one results file; a failed step is recorded
# and the check goes on. Aim: under 8 minutes (the first wgpu process compiles its shaders).
#
# Environment: PYTHON (default python3), BACKENDS (default: the bundle's), HF_DEVICE (cuda:0),
# CONFIGS (b128 b512), PRECISIONS (f32 bf16), STEP_TIMEOUT (seconds per step, 240).
# A dry run on a machine without NVIDIA GPU (wgpu on lavapipe, transformers on the CPU):
#   HF_DEVICE=cpu CONFIGS=small PRECISIONS=f32 bash gpu-bundle/scripts/gpu-check.sh
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
PYTHON=${PYTHON:-python3}
HF_DEVICE=${HF_DEVICE:-cuda:0}
CONFIGS=${CONFIGS:-b128 b512}
PRECISIONS=${PRECISIONS:-f32 bf16}
STEP_TIMEOUT=${STEP_TIMEOUT:-240}
RESULTS=${RESULTS:-$here/gpu-check-results.md}
work=$here/gpu-check-work
rm -rf "$work" && mkdir -p "$work"
: >"$RESULTS"
start=$(date +%s)
say() { echo "gpu-check [$(($(date +%s) - start)) s]: $*" | tee -a "$RESULTS" >&2; }
guard() { timeout --kill-after=10 "$STEP_TIMEOUT" "$@"; }
failures=0
verdict() { # verdict NAME STATUS DETAIL
  if [[ $2 == 0 ]]; then say "PASS $1: $3"; else say "FAIL $1: $3"; failures=$((failures + 1)); fi
}

for x in bin/*.xz; do
  [[ -e ${x%.xz} ]] || xz -dk "$x"
done
chmod +x bin/masklm bin/bench
masklm=$here/bin/masklm
BACKENDS=${BACKENDS:-$(tr ',' ' ' <bin/FEATURES)}
say "bundle of commit $(cat bin/COMMIT 2>/dev/null), backends: $BACKENDS"
gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null) \
  || gpu="no NVIDIA GPU visible (nvidia-smi failed)"
say "GPU: $gpu"
say "python: $("$PYTHON" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' 2>&1 | tail -1)"

# The Vulkan loader, unpacked beside the bundle when the machine has none.
if ! ldconfig -p | grep -q 'libvulkan.so.1'; then
  for deb in debs/*.deb; do dpkg -x "$deb" "$here/vulkan"; done
  export LD_LIBRARY_PATH="$here/vulkan/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
for icd in /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json; do
  if [[ -e $icd && -z ${VK_DRIVER_FILES:-} ]] && ! ls /usr/share/vulkan/icd.d/nvidia* /etc/vulkan/icd.d/nvidia* >/dev/null 2>&1; then
    export VK_DRIVER_FILES=$icd
  fi
done
# NVRTC for the cuda backend: the pip nvidia packages torch depends on ship it.
nvrtc=$("$PYTHON" - <<'EOF' 2>/dev/null
import glob, os, site
bases = site.getsitepackages() + [site.getusersitepackages()]
hits = [p for b in bases for p in glob.glob(os.path.join(b, "nvidia", "**", "libnvrtc.so*"), recursive=True)]
print(os.path.dirname(sorted(hits)[0]) if hits else "")
EOF
)
[[ -n $nvrtc ]] && export LD_LIBRARY_PATH="$nvrtc${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp}
declare -A device=([cuda]=0 [wgpu]=auto)

# --- 1. parity with the CPU backend -------------------------------------------------------
fixtures=$here/tests/fixtures
sentences=("The binding of a <mask> to a receptor." "Any process that modulates the <mask> of a cell."
  "The chemical reactions and pathways involving <mask>.")
cat >"$work/tiny.toml" <<EOF
seed = 7
[model]
hidden_size = 32
num_hidden_layers = 2
num_attention_heads = 2
intermediate_size = 64
max_position_embeddings = 70
hidden_dropout_prob = 0.0
attention_probs_dropout_prob = 0.0
[data]
tokenizer = "$fixtures/tokenizer-go"
inputs = ["$fixtures/tokenizer-corpus.txt"]
cache = "$work/cache"
max_seq_length = 64
validation_split = 0.05
[optimizer]
lr = 2e-3
[schedule]
warmup_steps = 5
[training]
batch_size = 8
max_steps = 20
[eval]
eval_steps = 0
[checkpoint]
save_steps = 20
[logging]
log_steps = 1
EOF
run_side() { # run_side BACKEND: fill-mask, eval and 20 training steps into $work/BACKEND.*
  local b=$1 dev=()
  [[ $b != cpu ]] && dev=(--device "${device[$b]}")
  step "$b" fill "$masklm" --backend "$b" "${dev[@]}" fill-mask --model "$fixtures/roberta-tiny" \
    --json --top-k 5 "${sentences[@]}" &&
  step "$b" eval "$masklm" --backend "$b" "${dev[@]}" eval --model "$fixtures/roberta-tiny" \
    --input "$fixtures/tokenizer-corpus.txt" --max-seq-length 64 --json &&
  step "$b" train "$masklm" --backend "$b" "${dev[@]}" train --config "$work/tiny.toml" \
    --out "$work/run-$b"
}
step() { # step BACKEND NAME COMMAND...: stdout to $work/BACKEND.NAME, a failure's reason to .err
  local b=$1 name=$2 status
  shift 2
  guard "$@" >"$work/$b.$name" 2>"$work/$b.$name.err"
  status=$?
  if ((status == 124 || status == 137)); then
    echo "$name timed out after $STEP_TIMEOUT s (STEP_TIMEOUT)" >>"$work/$b.$name.err"
  elif ((status != 0)); then
    echo "$name exited with status $status" >>"$work/$b.$name.err"
  fi
  return $status
}
compare() { # compare BACKEND: prints a one-line verdict detail, exits 1 on a mismatch
  "$PYTHON" - "$work" "$1" <<'EOF'
import json, sys
work, b = sys.argv[1], sys.argv[2]
def fill(side):
    return [[(c["token"], c["score"]) for c in json.loads(l)] for l in open(f"{work}/{side}.fill")]
def losses(side):
    out = {}
    for l in open(f"{work}/run-{side}/metrics.jsonl"):
        r = json.loads(l)
        if "loss" in r and "step" in r:
            out[r["step"]] = r["loss"]
    return out
ok = True
cpu, gpu = fill("cpu"), fill(b)
score = max(abs(x[1] - y[1]) for a, c in zip(cpu, gpu) for x, y in zip(a, c))
same = all([t for t, _ in a] == [t for t, _ in c] for a, c in zip(cpu, gpu))
ok &= same and score <= 1e-4
p_cpu = json.load(open(f"{work}/cpu.eval"))["perplexity"]
p_gpu = json.load(open(f"{work}/{b}.eval"))["perplexity"]
ok &= abs(p_cpu - p_gpu) <= 1e-4 * p_cpu
l_cpu, l_gpu = losses("cpu"), losses(b)
worst = max((abs(l_cpu[s] - l_gpu.get(s, float("inf"))) for s in l_cpu), default=float("inf"))
ok &= len(l_cpu) == 20 and worst <= 1e-3
print(f"fill-mask top-5 {'same' if same else 'DIFFERENT'} tokens, scores within {score:.1e}; "
      f"perplexity {p_gpu:.6f} vs {p_cpu:.6f}; 20 losses within {worst:.1e}")
sys.exit(0 if ok else 1)
EOF
}
if run_side cpu; then
  for b in $BACKENDS; do
    t0=$(date +%s)
    if run_side "$b"; then
      detail=$(compare "$b" 2>&1); status=$?
      detail=$(tail -1 <<<"$detail")  # a traceback's last line names what went wrong
    else
      status=1
      detail="a command failed: $(cat "$work/$b".*.err 2>/dev/null | grep -v '^\s*$' | tail -3 | tr '\n' ' ')"
    fi
    verdict "parity $b vs cpu ($(($(date +%s) - t0)) s)" "$status" "$detail"
  done
else
  verdict "parity" 1 "the cpu side failed: $(tail -3 "$work"/cpu.*.err | tr '\n' ' ')"
fi

# --- 2. throughput beside transformers + PyTorch ------------------------------------------
bench_devices=(DEVICE_cuda=0 DEVICE_wgpu=auto)
for precision in $PRECISIONS; do
  say "throughput, $precision (configs: $CONFIGS)"
  env "${bench_devices[@]}" BENCH="$here/bin/bench" PYTHON="$PYTHON" \
    BACKENDS="$BACKENDS" CONFIGS="$CONFIGS" PRECISION="$precision" HF_DEVICE="$HF_DEVICE" ROUNDS=1 \
    SIDE_TIMEOUT="$STEP_TIMEOUT" \
    GPU_MEM=$([[ $HF_DEVICE == cuda* ]] && echo 1 || echo 0) \
    bash scripts/bench.sh >>"$RESULTS" 2>"$work/bench-$precision.err"
  status=$?
  [[ $status == 0 ]] || verdict "throughput $precision" "$status" "$(tail -3 "$work/bench-$precision.err" | tr '\n' ' ')"
  # A side that ran over SIDE_TIMEOUT is a "failed" row in the table; count it.
  while read -r failed; do
    verdict "throughput $precision" 1 "$failed: no result (over ${STEP_TIMEOUT} s or crashed; see gpu-check-work/bench-$precision.err)"
  done < <(grep -o "round [0-9]* [a-z0-9]* [a-z]*: failed" "$work/bench-$precision.err")
done
say "done: $failures failed step(s); results in $RESULTS"
exit $((failures > 0))
