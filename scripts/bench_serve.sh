#!/usr/bin/env bash
# Load benchmark of `masklm serve` against transformers' pipeline("fill-mask") served the usual
# way (scripts/serve_transformers.py: a threading HTTP server, batch 1), on the same machine:
# CLIENTS concurrent keep-alive clients for SECONDS each, fill-mask requests made from held-out
# GO definitions (one word masked), against the small fixture and the quickstart model.
# Sides: masklm with batching (default flags), masklm --max-batch 1, transformers. Three rounds,
# the order of the sides alternating; the table gives the median of the three.
#
#   bash scripts/bench_serve.sh [CLIENTS=64] [SECONDS=20]
set -euo pipefail
cd "$(dirname "$0")/.."
clients=${1:-64}
seconds=${2:-20}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/masklm-target}"
python=${MASKLM_PYTHON:-/var/tmp/masklm-venv/bin/python}
cargo build --release -q -p masklm
cargo build --release -q -p masklm-serve --example load
masklm="$CARGO_TARGET_DIR/release/masklm"
load="$CARGO_TARGET_DIR/release/examples/load"
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

# Requests: the last 2,000 GO definitions (held out by the quickstart's 2% validation split),
# of at most 120 characters (all models take them), one word of 4+ letters masked at random (seed 0).
"$python" - "$work/inputs.txt" <<'PY'
import random, sys
random.seed(0)
lines = open("data/go/definitions.txt").read().splitlines()[-2000:]
out = []
for line in lines:
    if len(line) > 120:
        continue
    words = line.split()
    spots = [i for i, w in enumerate(words) if i > 0 and w.isalpha() and len(w) >= 4]
    if spots:
        words[random.choice(spots)] = "<mask>"
        out.append(" ".join(words))
open(sys.argv[1], "w").write("\n".join(out) + "\n")
PY

models=("fixture=tests/fixtures/roberta-tiny")
if [[ -f runs/quickstart/checkpoints/latest ]]; then
  "$masklm" export --checkpoint runs/quickstart --out "$work/quickstart-hf" >/dev/null
  models+=("quickstart=$work/quickstart-hf")
else
  echo "note: runs/quickstart missing (bash scripts/quickstart.sh makes it); fixture only" >&2
fi

port=8187
wait_ready() {  # PID: until the server answers a fill-mask request
  for _ in $(seq 600); do
    kill -0 "$1" 2>/dev/null || { echo "server died" >&2; return 1; }
    if curl -sf -o /dev/null -H 'content-type: application/json' \
        -d '{"inputs": "The <mask> of a protein."}' "http://127.0.0.1:$port/v1/fill-mask"; then
      return 0
    fi
    sleep 0.2
  done
  return 1
}

results="$work/results.jsonl"
for round in 1 2 3; do
  sides=(masklm masklm-unbatched transformers)
  if (( round % 2 == 0 )); then sides=(transformers masklm-unbatched masklm); fi
  for spec in "${models[@]}"; do
    name=${spec%%=*}; dir=${spec#*=}
    for side in "${sides[@]}"; do
      case $side in
        masklm) "$masklm" serve --model "$dir" --port $port 2>/dev/null & ;;
        masklm-unbatched) "$masklm" serve --model "$dir" --port $port --max-batch 1 2>/dev/null & ;;
        transformers) "$python" scripts/serve_transformers.py --model "$dir" --port $port >/dev/null 2>&1 & ;;
      esac
      pid=$!
      wait_ready $pid
      "$load" "http://127.0.0.1:$port" "$work/inputs.txt" "$clients" 2 >/dev/null  # warm-up
      line=$("$load" "http://127.0.0.1:$port" "$work/inputs.txt" "$clients" "$seconds")
      rss=$(awk '/VmHWM/ {print $2}' /proc/$pid/status)
      # masklm drains on SIGINT; Python's SIGINT handler can hang in torch's threads at exit.
      if [[ $side == transformers ]]; then kill $pid; else kill -INT $pid; fi
      wait $pid 2>/dev/null || true
      echo "{\"round\": $round, \"model\": \"$name\", \"side\": \"$side\", \"peak_rss_kb\": $rss, \"load\": $line}" | tee -a "$results" >&2
    done
  done
done

"$python" - "$results" "$clients" "$seconds" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"\n{sys.argv[2]} clients x {sys.argv[3]} s, median of 3 rounds (errors: total)\n")
print("| model | server | requests/s | p50 ms | p99 ms | errors | peak RSS MB |")
print("|---|---|---|---|---|---|---|")
for model in dict.fromkeys(r["model"] for r in rows):
    for side in ["masklm", "masklm-unbatched", "transformers"]:
        rs = [r for r in rows if r["model"] == model and r["side"] == side]
        med = lambda k: statistics.median(r["load"][k] for r in rs)
        print(f"| {model} | {side} | {med('requests_per_second'):.1f} | {med('p50_ms'):.1f} | "
              f"{med('p99_ms'):.1f} | {sum(r['load']['errors'] for r in rs)} | "
              f"{max(r['peak_rss_kb'] for r in rs) / 1024:.0f} |")
PY
