#!/usr/bin/env bash
# Prepare benchmark: masklm prepare vs transformers/datasets (run_mlm.py's map + group_texts)
# on the PubMed abstracts, side by side in one run. Needs scripts/fetch-pubmed.sh first and the
# reference venv (scripts/requirements.txt) at $VENV (default /var/tmp/masklm-venv).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/var/tmp/masklm-venv}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/masklm-target}"
files=(data/pubmed/pubmed20n0014.txt data/pubmed/pubmed21n1298.txt)
for f in "${files[@]}"; do
  [[ -f $f ]] || { echo "missing $f: run scripts/fetch-pubmed.sh" >&2; exit 1; }
done
cargo build --release -q -p masklm
masklm="$CARGO_TARGET_DIR/release/masklm"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$masklm" tokenizer train --input "${files[@]}" --vocab-size 8192 --out "$work/tok" >/dev/null
mb=$(du -cb "${files[@]}" | tail -1 | awk '{print $1/1e6}')

/usr/bin/time -f "%e %M" -o "$work/ours.time" \
  "$masklm" prepare --tokenizer "$work/tok" --input "${files[@]}" --out "$work/cache" \
  --max-seq-length 512 --packing full --validation-split 0 >/dev/null 2>&1
read -r ours_s ours_kb < "$work/ours.time"
hf=$("$VENV/bin/python" scripts/bench_prepare_hf.py --tokenizer "$work/tok" --max-seq-length 512 "${files[@]}" 2>/dev/null)
hf_s=$(sed -E 's/.*seconds=([0-9.]+).*/\1/' <<<"$hf")
hf_rss=$(sed -E 's/.*rss_mb=([0-9.]+).*/\1/' <<<"$hf")

printf '| %-28s | %8s | %8s | %11s |\n' tool seconds "MB/s" "peak RSS MB"
printf '|%s|%s|%s|%s|\n' ------------------------------ ---------- ---------- -------------
awk -v mb="$mb" -v s="$ours_s" -v kb="$ours_kb" 'BEGIN{printf "| %-28s | %8.2f | %8.1f | %11.0f |\n", "masklm prepare", s, mb/s, kb/1024}'
awk -v mb="$mb" -v s="$hf_s" -v rss="$hf_rss" 'BEGIN{printf "| %-28s | %8.2f | %8.1f | %11.0f |\n", "datasets.map + group_texts", s, mb/s, rss}'
awk -v a="$ours_s" -v b="$hf_s" -v ra="$ours_kb" -v rb="$hf_rss" 'BEGIN{printf "RESULT prepare speed_ratio=%.2f rss_ratio=%.2f corpus_mb=%.1f\n", b/a, (ra/1024)/rb, '"$mb"'}'
