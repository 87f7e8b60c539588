#!/usr/bin/env bash
# The main job: train a small RoBERTa from scratch on the shipped Gene Ontology corpus
# (about 5 minutes on 2 CPU cores), evaluate it, checkpoint it, and query it with fill-mask.
# Re-running continues (or, when finished, reuses) runs/quickstart.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/masklm-target}"
cargo build --release -p masklm
masklm="$CARGO_TARGET_DIR/release/masklm"

if [[ ! -f runs/quickstart-tokenizer/tokenizer.json ]]; then
  "$masklm" tokenizer train --input data/go/definitions.txt --vocab-size 4096 \
    --out runs/quickstart-tokenizer
fi
if [[ -f runs/quickstart/checkpoints/latest ]]; then
  # Continue an interrupted run; a finished one (step == total_steps) is kept as it is.
  state="runs/quickstart/checkpoints/$(cat runs/quickstart/checkpoints/latest)/state.json"
  step=$(sed -nE 's/^ *"step": ([0-9]+).*/\1/p' "$state")
  total=$(sed -nE 's/^ *"total_steps": ([0-9]+).*/\1/p' "$state")
  if [[ "$step" != "$total" ]]; then
    "$masklm" train --resume runs/quickstart
  else
    echo "runs/quickstart is a finished run (step $step); to train it again with the current" \
      "configs/quickstart.toml: rm -rf runs/quickstart runs/quickstart-cache runs/quickstart-tokenizer" >&2
  fi
else
  "$masklm" train --config configs/quickstart.toml --out runs/quickstart
fi
checkpoint="runs/quickstart/checkpoints/$(cat runs/quickstart/checkpoints/latest)"
"$masklm" fill-mask --model "$checkpoint" --top-k 5 \
  "Catalysis of the reaction: ATP + H2O = ADP + <mask>." \
  "The chemical reactions and pathways resulting in the formation of <mask>, a nucleoside." \
  "Any process that activates or increases the frequency, rate or extent of cell <mask>."
"$masklm" probe --model "$checkpoint" --probes configs/probes-go.tsv
