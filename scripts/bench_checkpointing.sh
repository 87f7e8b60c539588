#!/usr/bin/env bash
# Gradient checkpointing (`[training] gradient_checkpointing = true`) off and on at the
# roberta-base shape (hidden 768, 12 layers, 12 heads, FFN 3072, vocab 50265) with 512-token
# rows: peak RSS of the training process and train tokens/s (full optimizer steps, as
# `masklm train` runs them), medians of ROUNDS runs alternating off, on, on, off, ...
#
#   BATCH=4 STEPS=3 ROUNDS=3 bash scripts/bench_checkpointing.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/masklm-target}"
batch="${BATCH:-4}"
steps="${STEPS:-3}"
rounds="${ROUNDS:-3}"
cargo build --release -p masklm --example bench ${FEATURES:+--features "$FEATURES"} 2> /dev/null
bench="$CARGO_TARGET_DIR/release/examples/bench"
shape=(--hidden 768 --layers 12 --heads 12 --ffn 3072 --vocab 50265 --seq 512
  --batch "$batch" --steps "$steps" --warmup 1 --eval-steps 0 ${BACKEND:+--backend "$BACKEND"})
results=$(mktemp)
for r in $(seq 1 "$rounds"); do
  if (( r % 2 )); then order="off on"; else order="on off"; fi
  for mode in $order; do
    flag=()
    [[ $mode == on ]] && flag=(--gradient-checkpointing)
    line=$("$bench" "${shape[@]}" "${flag[@]}" | grep MASKLM_BENCH)
    echo "round $r $mode: $line" >&2
    echo "$mode $line" >> "$results"
  done
done
python3 - "$results" "$batch" <<'PY'
import re, statistics, sys
rows = {"off": [], "on": []}
for line in open(sys.argv[1]):
    mode = line.split()[0]
    tps = float(re.search(r"train_tps=([\d.]+)", line).group(1))
    rss = float(re.search(r"rss_mb=([\d.]+)", line).group(1))
    rows[mode].append((rss, tps))
med = {m: (statistics.median(r for r, _ in v), statistics.median(t for _, t in v)) for m, v in rows.items()}
print(f"roberta-base shape, batch {sys.argv[2]} x 512, medians of {len(rows['off'])} runs each")
print("| gradient_checkpointing | peak RSS (MB) | train tok/s |")
print("|---|---:|---:|")
for m in ("off", "on"):
    print(f"| {m} | {med[m][0]:.0f} | {med[m][1]:.1f} |")
(r0, t0), (r1, t1) = med["off"], med["on"]
print(f"on/off: peak RSS {r1 / r0:.0%}, throughput {t1 / t0:.0%} ({1 - t1 / t0:.0%} slower)")
PY
rm -f "$results"
