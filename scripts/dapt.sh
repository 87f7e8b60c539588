#!/usr/bin/env bash
# Domain-adaptive pre-training end to end (README, "Domain adaptation"): start from the
# quickstart's Gene Ontology model (or the Hugging Face folder / masklm checkpoint given as $1),
# audit and extend its vocabulary on PubMed abstracts (scripts/fetch-pubmed.sh), continue
# training on PubMed mixed with 10% GO (configs/dapt-pubmed.toml), and print domain vs general
# perplexity and probe MRR before and after.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/masklm-target}"
cargo build --release -p masklm
masklm="$CARGO_TARGET_DIR/release/masklm"

base="${1:-runs/quickstart/checkpoints/best}"
if [[ $# -eq 0 && ! -e "$base" ]]; then
  bash scripts/quickstart.sh
fi
[[ -f data/pubmed/pubmed21n1298.txt ]] || bash scripts/fetch-pubmed.sh

# Held-out text: the last 1,000 abstracts of the 2021 file and the last 3,000 GO definitions.
data=runs/dapt-data
mkdir -p "$data"
head -n -1000 data/pubmed/pubmed21n1298.txt > "$data/pubmed-train.txt"
tail -n 1000 data/pubmed/pubmed21n1298.txt > "$data/pubmed-heldout.txt"
head -n -3000 data/go/definitions.txt > "$data/go-train.txt"
tail -n 3000 data/go/definitions.txt > "$data/go-heldout.txt"

echo "== how the base tokenizer splits PubMed"
"$masklm" vocab audit --model "$base" --input "$data/pubmed-train.txt" --top 15
echo "== adding up to 1,000 new tokens: the PubMed words that save the most tokens"
"$masklm" vocab extend --model "$base" --input "$data/pubmed-train.txt" --add 1000 \
  --min-count 20 --out runs/dapt-extended --force | tail -n 4
"$masklm" vocab audit --model runs/dapt-extended --input "$data/pubmed-train.txt" --top 5 | head -n 1

echo "== continued pre-training (configs/dapt-pubmed.toml)"
rm -rf runs/dapt-pubmed
"$masklm" train --config configs/dapt-pubmed.toml --out runs/dapt-pubmed
echo "== probes after"
"$masklm" probe --model runs/dapt-pubmed/checkpoints/best --probes configs/probes-pubmed.tsv
