#!/usr/bin/env bash
# Packing without padding (`[data] packing = "documents"`) against one document per row
# (`packing = "line"`) on the quickstart recipe (configs/quickstart.toml: GO definitions,
# 48-token rows, batch 64): real (non-pad) tokens per second, real tokens per step, and the
# held-out perplexity at equal real tokens (the packed curve interpolated, in log tokens, at
# the line run's last token count). ROUNDS alternate line, documents, documents, line, ...
#
#   STEPS=300 ROUNDS=3 bash scripts/bench_packing.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/masklm-target}"
masklm="${MASKLM:-$CARGO_TARGET_DIR/release/masklm}"
out="${OUT:-/var/tmp/bench-packing}"
steps="${STEPS:-300}"
rounds="${ROUNDS:-1}"
mkdir -p "$out"
if [[ ! -f "$out/tokenizer/tokenizer.json" ]]; then
  "$masklm" tokenizer train --input data/go/definitions.txt --vocab-size 4096 \
    --out "$out/tokenizer" > /dev/null
fi
run() { # packing round
  local dir="$out/$1-r$2"
  rm -rf "$dir"
  "$masklm" train --config configs/quickstart.toml --out "$dir" \
    --set "data.packing=\"$1\"" --set "data.cache=\"$out/cache-$1\"" \
    --set "data.tokenizer=\"$out/tokenizer\"" --set "training.max_steps=$steps" \
    --set "eval.eval_steps=50" --set "checkpoint.save_steps=$steps" > "$dir.log" 2>&1
}
for r in $(seq 1 "$rounds"); do
  if (( r % 2 )); then order="line documents"; else order="documents line"; fi
  for p in $order; do run "$p" "$r"; done
done
python3 - "$out" "$rounds" <<'PY'
import json, math, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def read(path):
    logs, evals = {}, {}
    for line in open(path):
        r = json.loads(line)
        if "tokens_seen" in r:
            logs[r["step"]] = r
        if "eval_perplexity" in r:
            evals[r["step"]] = r["eval_perplexity"]
    return logs, evals
def curve(logs, evals):
    # (real tokens seen, perplexity) at each evaluation after step 0.
    return [(logs[s]["tokens_seen"], p) for s, p in sorted(evals.items()) if s in logs]
def at(points, tokens):
    for (t0, p0), (t1, p1) in zip(points, points[1:]):
        if t0 <= tokens <= t1:
            f = (math.log(tokens) - math.log(t0)) / (math.log(t1) - math.log(t0))
            return math.exp(math.log(p0) + f * (math.log(p1) - math.log(p0)))
    return float("nan")
rows = {"line": [], "documents": []}
for r in range(1, rounds + 1):
    runs = {p: read(f"{out}/{p}-r{r}/metrics.jsonl") for p in rows}
    line_logs, line_evals = runs["line"]
    last = max(line_logs)
    equal_tokens = line_logs[last]["tokens_seen"]
    for p, (logs, evals) in runs.items():
        speeds = [l["tokens_per_second"] for s, l in logs.items() if s > 10]
        final = max(logs)
        rows[p].append((
            statistics.median(speeds),
            logs[final]["tokens_seen"] / final,
            evals[max(evals)],
            at(curve(logs, evals), equal_tokens),
        ))
print(f"| packing | real tok/s | real tokens/step | val ppl after {max(line_logs)} steps | val ppl at the line run's {equal_tokens:,} real tokens |")
print("|---|---|---|---|---|")
for p, values in rows.items():
    med = [statistics.median(v[i] for v in values) for i in range(4)]
    print(f"| {p} | {med[0]:,.0f} | {med[1]:,.0f} | {med[2]:.2f} | {med[3]:.2f} |")
PY
